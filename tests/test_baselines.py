"""The paper's baselines (MMFullFT, MMAdapter, MMLoRA, MMBitFit, MMFrozen) on the shared item
pipeline: what trains (counted exactly), end-to-end runs, checkpoints, modalities, errors."""
from __future__ import annotations

import glob
import os
import types

import pytest
import torch
import yaml
from recbole.utils import init_seed
from torch import nn

from recbole_iisan.config import Config, properties_dir
from recbole_iisan.data.encoders import load_encoder
from recbole_iisan.efficiency import count_parameters as efficiency_counts
from recbole_iisan.model.layers import count_parameters
from recbole_iisan.model.mm_adapter import adapter_sites, add_adapters
from recbole_iisan.model.mm_base import freeze_unreachable
from recbole_iisan.model.mm_bitfit import train_biases_only
from recbole_iisan.model.mm_lora import add_lora, lora_targets
from recbole_iisan.quick_start import run_recbole_iisan
from recbole_iisan.trainer import IISANTrainer
from recbole_iisan.utils import create_dataset, data_preparation, get_model

BASELINES = ["MMFullFT", "MMAdapter", "MMLoRA", "MMBitFit", "MMFrozen"]
TUNED = ["MMFullFT", "MMAdapter", "MMLoRA", "MMBitFit"]
D, WIDTH, LAYERS, R_ADAPTER, INNER = 16, 32, 4, 8, 32  # plugin_config and the tiny bert32 / vit32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On two shared cores, torch's default two threads spin against each other (tiny ops
    # run ~15x slower); one thread keeps these backbone-in-the-loop tests fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(model_name: str, config_dict: dict, seed: int | None = None):
    """Dataset, loaders and model, seeded as ``run_recbole_iisan`` seeds its model (or with ``seed``)."""
    config = Config(model_name, "demo", config_dict=config_dict, cmd_args=[])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    init_seed(config["seed"] if seed is None else seed, config["reproducibility"])
    model = get_model(model_name)(config, train.dataset).to(config["device"])
    return config, model, (train, valid, test)


def linear(i: int, o: int) -> int:
    return i * o + o


def reference_backbones(tiny_models) -> dict:
    """Freshly loaded tiny backbones (last-layer taps), to count against."""
    return {"text": load_encoder("text", tiny_models["bert32"], taps=[LAYERS - 1]).backbone,
            "image": load_encoder("image", tiny_models["vit32"], taps=[LAYERS - 1]).backbone}


def off_path(name: str) -> bool:
    # What the last-layer state never reaches: the poolers, and ViT's final LayerNorm
    # (applied after the hidden states HF returns).
    return name.startswith(("pooler.", "layernorm."))


def expected_backbone_trainable(model_name: str, backbones: dict, config) -> int:
    if model_name == "MMFrozen":
        return 0
    total = 0
    for backbone in backbones.values():
        named = list(backbone.named_parameters())
        if model_name == "MMFullFT":
            total += sum(p.numel() for n, p in named if not off_path(n))
        elif model_name == "MMBitFit":
            total += sum(p.numel() for n, p in named if n.endswith(".bias") and not off_path(n))
        elif model_name == "MMLoRA":
            # A: r x in, B: out x r on query and value of every layer (no bias).
            total += LAYERS * 2 * config["lora_r"] * (WIDTH + WIDTH)
        elif model_name == "MMAdapter":
            # Two bottleneck adapters per layer: Linear(w, r) + Linear(r, w).
            total += LAYERS * 2 * (linear(WIDTH, R_ADAPTER) + linear(R_ADAPTER, WIDTH))
    return total


def head_and_user_encoder(config, n_modalities: int = 2) -> int:
    head = n_modalities * linear(WIDTH, D) + linear(n_modalities * D, D)
    L = config["MAX_ITEM_LIST_LENGTH"]
    user = L * D + 2 * D + 2 * (4 * linear(D, D) + linear(D, INNER) + linear(INNER, D) + 4 * D)
    return head + user


# -- what trains ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", BASELINES)
def test_trainable_parameters_counted_exactly(plugin_config, tiny_models, model_name):
    config, model, _ = build(model_name, plugin_config)
    backbones = reference_backbones(tiny_models)
    backbone_trainable = expected_backbone_trainable(model_name, backbones, config)
    assert count_parameters(model) == backbone_trainable + head_and_user_encoder(config)

    trained = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoders.")]
    marker = {"MMAdapter": ".adapter.", "MMLoRA": ".lora_", "MMBitFit": ".bias"}.get(model_name)
    if marker:
        assert trained and all(marker in n for n in trained), trained[:5]
    if model_name == "MMFrozen":
        assert len(model.encoders) == 0 and not any(n.startswith("encoders.") for n in model.state_dict())
    # total_params always counts the backbones, held (plus what was inserted) or not.
    backbone_size = sum(p.numel() for b in backbones.values() for p in b.parameters())
    inserted = backbone_trainable if model_name in ("MMAdapter", "MMLoRA") else 0
    figures = efficiency_counts(model)
    assert figures["total_params"] == backbone_size + inserted + head_and_user_encoder(config)
    assert figures["trainable_params"] == count_parameters(model)


@pytest.mark.parametrize("model_name", TUNED)
def test_training_changes_exactly_the_trainable_backbone_parameters(plugin_config, model_name):
    config, model, (train, _, _) = build(model_name, dict(plugin_config, train_batch_size=32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = IISANTrainer(config, model)
    trainer._train_epoch(train, 0)
    assert len(train) >= 2  # LoRA's A only gets a gradient once B has left zero
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, (name, p.requires_grad)


def test_fine_tuned_backbones_train_with_dropout_frozen_ones_do_not(plugin_config):
    _, model, _ = build("MMFullFT", plugin_config)
    ids = torch.arange(1, 9)
    model.train()
    assert all(e.backbone.training for e in model.encoders.values())
    a, b = model.item_features("text", ids), model.item_features("text", ids)
    assert not torch.allclose(a, b)                 # BERT's dropout is active while fine-tuning
    model.eval()
    assert not any(e.backbone.training for e in model.encoders.values())
    with torch.no_grad():
        assert torch.equal(model.item_features("text", ids), model.item_features("text", ids))
    assert torch.equal(model.item_features("text", torch.tensor([0, 3]))[0], torch.zeros(WIDTH))


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", BASELINES)
def test_each_baseline_trains_and_tests_end_to_end(plugin_config, model_name):
    result = run_recbole_iisan(model_name, "demo", config_dict=plugin_config)
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    assert result["efficiency"]["train_seconds_per_epoch"] > 0

    # The checkpoint holds exactly the trainable parts (and buffers outside the backbones),
    # each of them moved away from the model's initial values.
    (saved,) = glob.glob(os.path.join(plugin_config["checkpoint_dir"], f"{model_name}-*.pth"))
    state = torch.load(saved, weights_only=False)["state_dict"]
    config, initial, _ = build(model_name, plugin_config)
    assert set(state) == set(initial.checkpoint_state_dict())
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    assert {k for k in state if k.startswith("encoders.")} <= trainable
    assert result["efficiency"]["trainable_params"] == count_parameters(initial)
    initial_state = initial.state_dict()
    unchanged = [k for k in trainable if torch.equal(state[k], initial_state[k])]
    assert not unchanged, unchanged[:5]


def test_lora_checkpoint_excludes_the_backbone_and_reloads_to_identical_scores(plugin_config):
    config, model, (train, valid, test) = build("MMLoRA", plugin_config)
    trainer = IISANTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    backbone_keys = [k for k in state if k.startswith("encoders.")]
    # bert32 and vit32: 4 layers x (query, value) x (A, B) each
    assert len(backbone_keys) == 2 * LAYERS * 2 * 2
    assert all(".lora_A." in k or ".lora_B." in k for k in backbone_keys)
    assert not any("base_layer" in k for k in state)
    assert sum(state[k].numel() for k in backbone_keys) == 2 * LAYERS * 2 * config["lora_r"] * 2 * WIDTH

    _, fresh, _ = build("MMLoRA", plugin_config, seed=7)
    model.eval(), fresh.eval()
    interaction = next(iter(valid))[0]
    with torch.no_grad():
        trained_scores = model.full_sort_predict(interaction)
        assert not torch.allclose(fresh.full_sort_predict(interaction), trained_scores)
        fresh.load_checkpoint_state_dict(state)
        assert torch.allclose(fresh.full_sort_predict(interaction), trained_scores, atol=1e-6)
    reloaded = IISANTrainer(config, fresh)
    assert (reloaded.evaluate(test, load_best_model=True, model_file=trainer.saved_model_file)
            == trainer.evaluate(test, load_best_model=True))


# -- modalities ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["MMBitFit", "MMFrozen"])
@pytest.mark.parametrize("modality,parts", [("text", ["text"]), ("image", ["image"]),
                                            ("multimodal", ["image", "text"])])
def test_modalities_shapes(plugin_config, model_name, modality, parts):
    config, model, (train, valid, _) = build(model_name, dict(plugin_config, modality=modality))
    assert list(model.head.branches) == parts
    assert model.head.out.in_features == D * len(parts) and model.head.out.out_features == D
    if model_name == "MMBitFit":
        assert sorted(model.encoders) == sorted(parts)
    assert count_parameters(model) - count_parameters(model.encoders) == head_and_user_encoder(config, len(parts))
    loss = model.calculate_loss(next(iter(train)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())
    interaction = next(iter(valid))[0]
    with torch.no_grad():
        assert model.full_sort_predict(interaction).shape == (len(interaction), model.n_items)


def test_frozen_reads_the_iisan_versa_cache_and_matches_the_backbone(plugin_config):
    cfg = dict(plugin_config, cache_dtype="float32")
    _, versa, _ = build("IISANVersa", cfg)        # builds the layer cache
    assert set(versa.item_side.cache_build_seconds) == {"text", "image"}
    _, frozen, _ = build("MMFrozen", cfg)
    assert frozen.item_side.cache_build_seconds == {}  # the same files: nothing encoded again
    _, tuned, _ = build("MMBitFit", cfg)
    tuned.eval()
    ids = torch.arange(frozen.n_items)
    with torch.no_grad():
        for m in ("text", "image"):
            cached = frozen.item_features(m, ids)
            assert torch.equal(cached, torch.from_numpy(versa.item_side.layer_states(m)[:, -1].copy()))
            assert torch.allclose(cached, tuned.item_features(m, ids), atol=1e-5)


# -- errors ----------------------------------------------------------------------------------
def test_unknown_and_iisan_only_modalities_are_refused(plugin_config):
    with pytest.raises(ValueError, match="modality 'bogus'"):
        build("MMLoRA", dict(plugin_config, modality="bogus"))
    with pytest.raises(ValueError, match=r"MMLoRA: modality 'intra' is not one of multimodal, text, image"):
        build("MMLoRA", dict(plugin_config, modality="intra"))


def test_lora_and_adapters_name_unsupported_models(plugin_config):
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(vocab_size=20, n_embd=32, n_layer=2, n_head=2))  # fused c_attn, Conv1D
    encoder = types.SimpleNamespace(backbone=gpt2, modality="text", name="tiny-gpt2", n_layers=2)
    with pytest.raises(ValueError, match=r"GPT2Model\) has no attention query/value projections"):
        lora_targets(encoder)
    with pytest.raises(ValueError, match=r"tiny-gpt2' \(GPT2Model\) has 0 attention/FFN output projections"):
        adapter_sites(encoder)
    # image first: the branches (and backbones) are built in the order [image, text]
    with pytest.raises(ValueError, match=r"lora_target_modules \['nowhere'\] cannot be adapted in image_encoder"):
        build("MMLoRA", dict(plugin_config, lora_target_modules=["nowhere"]))


def test_frozen_needs_the_last_layer_in_the_cache(plugin_config):
    with pytest.raises(ValueError, match=r"text_taps \[1, 2\] .* end before its last layer 3"):
        build("MMFrozen", dict(plugin_config, text_taps=[1, 2]))


# -- the CNN (real EfficientNet-Lite0 weights) -------------------------------------------------
@pytest.fixture(scope="module")
def cnn_pixels():
    pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


def _cnn():
    return load_encoder("image", "efficientnet-lite0", taps=[15])


def test_cnn_lora_on_project_convs_starts_exactly_at_the_backbone(cnn_pixels):
    reference = _cnn().tap_states(cnn_pixels)
    encoder = _cnn()
    adapted = add_lora(encoder, r=4, alpha=8, dropout=0.0, targets=lora_targets(encoder))
    blocks = encoder.backbone._blocks
    assert adapted == [f"_blocks.{i}._project_conv" for i in range(len(blocks))]
    expected = sum(4 * (b._project_conv.in_features + b._project_conv.out_features) for b in blocks)
    assert count_parameters(encoder.backbone) == expected
    out = encoder.tap_states(cnn_pixels)
    assert torch.allclose(out, reference, atol=1e-5)  # B = 0: LoRA starts as the identity
    out[:, -1].sum().backward()
    assert blocks[0]._project_conv.lora_B["default"].weight.grad.abs().sum() > 0


def test_cnn_adapters_after_each_block_projection(cnn_pixels):
    reference = _cnn().tap_states(cnn_pixels)
    encoder = _cnn()
    sites = add_adapters(encoder, adapter_size=8)
    blocks = encoder.backbone._blocks
    assert sites == [f"_blocks.{i}._bn2" for i in range(len(blocks))]
    widths = [b._bn2.inner.num_features for b in blocks]
    assert count_parameters(encoder.backbone) == sum(linear(c, 8) + linear(8, c) for c in widths)
    out = encoder.tap_states(cnn_pixels)
    assert torch.allclose(out, reference, atol=0.05) and not torch.equal(out, reference)  # near identity
    out[:, -1].sum().backward()
    assert blocks[0]._bn2.adapter.block.down.weight.grad.abs().sum() > 0


def test_cnn_bitfit_trains_the_batchnorm_shifts_on_the_path():
    encoder = _cnn()
    assert train_biases_only(encoder.backbone) > 0
    frozen = freeze_unreachable(encoder)
    assert sorted(frozen) == ["_bn1.bias", "_fc.bias"]  # the classifier head after the last block
    net = encoder.backbone
    expected = sum(m.bias.numel() for n, m in net.named_modules()
                   if isinstance(m, nn.BatchNorm2d) and n != "_bn1")
    assert count_parameters(net) == expected


def test_cnn_batchnorm_statistics_stay_frozen_in_training(plugin_config):
    pytest.importorskip("efficientnet_lite_pytorch")
    _, model, _ = build("MMBitFit", dict(plugin_config, modality="image", image_encoder="efficientnet-lite0"))
    model.train()
    backbone = model.encoders["image"].backbone
    assert backbone.training
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)


# -- settings --------------------------------------------------------------------------------
def _yaml(name: str) -> dict:
    with open(properties_dir() / "model" / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def test_baselines_and_iisan_versa_share_one_settings_file_and_presets_hold_only_their_own_keys(
        small_demo_path):
    common, versa, shared = _yaml("ContentSequentialRecommender"), _yaml("IISANVersa"), _yaml("MMBaseline")
    assert not set(common) & set(versa) and not set(common) & set(shared)
    for name in ("IISANVersa", "MMLoRA"):
        config = Config(name, "demo", config_dict={"data_path": str(small_demo_path)}, cmd_args=[])
        assert {k: config[k] for k in common} == common, name
    for name in BASELINES:
        own = _yaml(name)
        assert not {k for k in own if k in shared and own[k] == shared[k]}, name


def test_presets_layer_over_the_shared_baseline_settings(small_demo_path):
    def config(model):
        return Config(model, "demo", config_dict={"data_path": str(small_demo_path)}, cmd_args=[])

    fft, lora, adapter = config("MMFullFT"), config("MMLoRA"), config("MMAdapter")
    assert (fft["train_batch_size"], fft["learning_rate"]) == (32, 1e-4)
    assert (lora["train_batch_size"], lora["learning_rate"], lora["lora_r"]) == (64, 2e-4, 8)
    assert adapter["adapter_size"] == 64
    for c in (fft, lora, adapter, config("MMFrozen"), config("MMBitFit")):
        assert c["modality"] == "multimodal" and c["train_protocol"] == "iisan" and c["loss_type"] == "inbatch"
