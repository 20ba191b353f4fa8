"""The bundled demo dataset: reproducible, loadable by RecBole, complete, content-driven."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "dataset" / "demo"
DEMO_YAML = REPO / "properties" / "dataset" / "demo.yaml"
MIN_INTERACTIONS = 5  # the 5-core of properties/dataset/demo.yaml


@pytest.fixture(scope="module")
def make_demo() -> ModuleType:
    """dataset/ is not a package, so load the generator script by path."""
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "dataset" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def histories() -> dict[str, list[str]]:
    """user -> item ids in file order (the order the generator wrote them)."""
    result: dict[str, list[str]] = {}
    with open(DEMO_DIR / "demo.inter", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert next(reader) == ["user_id:token", "item_id:token", "timestamp:float"]
        for user, item, _ in reader:
            result.setdefault(user, []).append(item)
    return result


@pytest.fixture(scope="module")
def titles() -> dict[str, str]:
    with open(DEMO_DIR / "demo.item", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert next(reader) == ["item_id:token", "title:token_seq"]
        return {item: title for item, title in reader}


@pytest.fixture
def numpy_aliases():
    """RecBole 1.2.1's Config touches aliases that numpy 2 removed."""
    added = []
    for name, target in [("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)]:
        if not hasattr(np, name):
            setattr(np, name, target)
            added.append(name)
    yield
    for name in added:
        delattr(np, name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _same_content(a: Path, b: Path) -> bool:
    # Text files must match byte for byte. JPEG bytes depend on the libjpeg build behind
    # Pillow, so images are compared by decoded pixels, within JPEG rounding.
    if a.suffix != ".jpg":
        return _sha256(a) == _sha256(b)
    with Image.open(a) as ia, Image.open(b) as ib:
        pa, pb = np.asarray(ia, dtype=np.int16), np.asarray(ib, dtype=np.int16)
    return pa.shape == pb.shape and int(np.abs(pa - pb).max()) <= 3


def test_regeneration_is_identical(make_demo, tmp_path):
    summary = make_demo.generate_demo(tmp_path / "demo", seed=make_demo.DEFAULT_SEED)
    committed, fresh = _relative_files(DEMO_DIR), _relative_files(tmp_path / "demo")
    assert fresh == committed
    changed = [name for name in committed
               if not _same_content(DEMO_DIR / name, tmp_path / "demo" / name)]
    assert not changed, f"{len(changed)} files differ from dataset/demo, first: {changed[:5]}"
    assert (summary.users, summary.items) == (make_demo.N_USERS, make_demo.N_ITEMS)
    assert summary.bytes_on_disk < 5_000_000


def test_another_seed_gives_other_data(make_demo, tmp_path):
    make_demo.generate_demo(tmp_path / "other", seed=7)
    assert _sha256(tmp_path / "other" / "demo.inter") != _sha256(DEMO_DIR / "demo.inter")


def test_timestamps_strictly_increase_per_user():
    last: dict[str, float] = {}
    with open(DEMO_DIR / "demo.inter", encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            user, _, stamp = line.rstrip("\n").split("\t")
            assert float(stamp) > last.get(user, -np.inf), f"demo.inter: time goes back for {user}"
            last[user] = float(stamp)


def test_recbole_loads_demo_as_sequential_dataset(numpy_aliases, histories, monkeypatch):
    from recbole.config import Config
    from recbole.data import create_dataset
    from recbole.data.dataset import SequentialDataset

    config_dict = yaml.safe_load(DEMO_YAML.read_text(encoding="utf-8"))
    # SASRec's default CE loss requires no train negatives; the rest keeps RecBole off the GPU.
    config_dict.update({"data_path": str(REPO / "dataset"), "train_neg_sample_args": None, "use_gpu": False})
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # Config reads --key=value from the command line
    config = Config(model="SASRec", dataset="demo", config_dict=config_dict)
    dataset = create_dataset(config)

    kept = {user: items for user, items in histories.items() if len(items) >= MIN_INTERACTIONS}
    assert len(kept) < len(histories), "the demo should exercise the 5-core filter"
    assert isinstance(dataset, SequentialDataset)
    # RecBole reserves internal id 0 for padding, hence the + 1.
    assert dataset.user_num == len(kept) + 1
    assert dataset.item_num == len({item for items in kept.values() for item in items}) + 1
    assert dataset.inter_num == sum(len(items) for items in kept.values())

    train, valid, test = dataset.build()
    assert len(valid) == len(test) == len(kept)  # leave-one-out: one valid and one test target per user


def test_every_item_has_title_and_image(make_demo, titles, histories):
    catalog = make_demo.make_catalog(make_demo.DEFAULT_SEED)
    assert list(titles) == [item.item_id for item in catalog]
    used = {item for items in histories.values() for item in items}
    assert used <= set(titles), f"demo.inter names items missing from demo.item: {sorted(used - set(titles))[:5]}"
    for item in catalog:
        title = titles[item.item_id]
        assert title.strip() and not title.startswith('"'), f"demo.item: bad title for {item.item_id}"
        with Image.open(DEMO_DIR / "images" / f"{item.item_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (make_demo.IMAGE_SIZE, make_demo.IMAGE_SIZE)
            pixels = np.asarray(image, dtype=np.float64)
        # The fill colour must be visible: a real share of pixels lies close to it.
        fill = np.array(make_demo.COLOURS[make_demo.COLOUR_NAMES[item.colour]][0], dtype=np.float64)
        near = np.linalg.norm(pixels - fill, axis=-1) < 80
        assert near.mean() > 0.05, f"images/{item.item_id}.jpg hardly shows its colour"


def test_titles_name_exactly_their_own_attributes(make_demo, titles):
    for item in make_demo.make_catalog(make_demo.DEFAULT_SEED):
        tokens = set(titles[item.item_id].replace(",", " ").split())
        colours = {i for i, name in enumerate(make_demo.COLOUR_NAMES) if tokens & set(make_demo.COLOURS[name][1])}
        kinds = {i for i, name in enumerate(make_demo.KIND_NAMES) if tokens & set(make_demo.KINDS[name])}
        nouns = make_demo.CATEGORIES[make_demo.CATEGORY_NAMES[item.category]][1]
        assert colours == {item.colour}, f"{item.item_id}: colour not readable from {titles[item.item_id]!r}"
        assert kinds == {item.kind}, f"{item.item_id}: kind not readable from {titles[item.item_id]!r}"
        assert any(noun in titles[item.item_id] for noun in nouns), f"{item.item_id}: no category noun"


def test_titles_are_not_all_templated_alike(titles):
    shapes = Counter(
        " ".join("w" if word.isalpha() else word for word in title.split()) for title in titles.values()
    )
    assert len(shapes) >= 5


def test_content_drives_the_next_item(make_demo, histories):
    catalog = {item.item_id: item for item in make_demo.make_catalog(make_demo.DEFAULT_SEED)}

    def shares_attribute(a: str, b: str) -> bool:
        x, y = catalog[a], catalog[b]
        return x.colour == y.colour or x.kind == y.kind or x.category == y.category

    pairs = [(a, b) for items in histories.values() for a, b in zip(items, items[1:])]
    observed = np.mean([shares_attribute(a, b) for a, b in pairs])
    # Chance: the same next items, paired with shuffled predecessors (keeps popularity).
    rng = np.random.default_rng(0)
    shuffled = rng.permutation([a for a, _ in pairs])
    chance = np.mean([shares_attribute(a, b) for a, (_, b) in zip(shuffled, pairs)])
    assert observed > chance + 0.3, (observed, chance)


def test_popularity_is_long_tailed(histories):
    counts = np.array(sorted(Counter(i for items in histories.values() for i in items).values(), reverse=True))
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.25  # the top 10% of items take far more than 10% of interactions
    assert counts[0] > 5 * np.median(counts)
