"""Shared fixtures: a small slice of the bundled demo dataset, and quiet RecBole runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import recbole_iisan  # noqa: F401  (adds the numpy aliases RecBole needs before it is used)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataset" / "demo"

# Settings that make a RecBole run small and quiet; tests add what they exercise.
QUICK = {
    "epochs": 1,
    "train_batch_size": 64,
    "eval_batch_size": 256,
    "show_progress": False,
    "state": "WARNING",
    "seed": 2024,
    "reproducibility": True,
}


def slice_demo(target: Path, n_users: int) -> Path:
    """Copy the first ``n_users`` users of the demo (and every item) into ``target/demo``."""
    out = target / "demo"
    out.mkdir(parents=True)
    lines = (DEMO / "demo.inter").read_text(encoding="utf-8").splitlines()
    users = []
    kept = [lines[0]]
    for line in lines[1:]:
        user = line.split("\t", 1)[0]
        if user not in users:
            if len(users) == n_users:
                continue
            users.append(user)
        kept.append(line)
    (out / "demo.inter").write_text("\n".join(kept) + "\n", encoding="utf-8")
    shutil.copy(DEMO / "demo.item", out / "demo.item")
    shutil.copytree(DEMO / "images", out / "images")
    return target


@pytest.fixture(scope="session")
def small_demo_path(tmp_path_factory) -> Path:
    """A data_path holding ``demo/``: 120 demo users, every demo item and image."""
    return slice_demo(tmp_path_factory.mktemp("data"), n_users=120)


@pytest.fixture
def quick_config(tmp_path, small_demo_path) -> dict:
    """A config dict for a one-epoch run on the small demo, writing under tmp_path."""
    return dict(QUICK, data_path=str(small_demo_path), checkpoint_dir=str(tmp_path / "saved"))


# -- tiny HF models, built from configs and saved like a user's real model folder ------------
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
    {w for line in (DEMO / "demo.item").read_text(encoding="utf-8").splitlines()[1:]
     for w in line.split("\t", 1)[1].lower().replace("-", " ").split()})


def save_tiny_bert(folder: Path, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """A random BERT of the given width with a word-level vocabulary of the demo titles."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def save_tiny_vit(folder: Path, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """A random ViT on 32x32 images with its own image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=37, image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Paths of tiny random encoders: bert32 / vit32 (symmetric) and vit48 (asymmetric)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "bert32": str(save_tiny_bert(root / "bert32")),
        "vit32": str(save_tiny_vit(root / "vit32")),
        "vit48": str(save_tiny_vit(root / "vit48", hidden=48, layers=6)),
    }


@pytest.fixture
def plugin_config(quick_config, tiny_models, tmp_path) -> dict:
    """A quick IISANVersa config on the small demo with tiny symmetric encoders."""
    return dict(quick_config, text_encoder=tiny_models["bert32"], image_encoder=tiny_models["vit32"],
                cache_dir=str(tmp_path / "cache"), encode_batch_size=128, text_max_length=16,
                embedding_size=16, adapter_size=8, inner_size=32)
