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
