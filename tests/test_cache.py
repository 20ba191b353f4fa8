"""The layer cache: keys, build/load round trips, atomicity and recovery."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_iisan.data.cache import CacheError, LayerCache, cache_key, content_digest

N_TAPS, WIDTH = 3, 4


class FakeEncoder:
    """Deterministic text -> [n_taps, width] vectors from a hash; counts its calls."""

    def __init__(self, fail_on_call: int | None = None, scale: float = 1.0):
        self.calls = 0
        self.seen: list = []
        self.fail_on_call = fail_on_call
        self.scale = scale

    def __call__(self, batch: list) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("encoder crashed mid-build")
        self.seen.extend(batch)
        return torch.stack([vector(text, self.scale) for text in batch])

    def fingerprint(self) -> dict:
        return {"name": "fake", "taps": [0, 2, 4], "pooling": "cls"}


def vector(text: str, scale: float = 1.0) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:4], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N_TAPS, WIDTH, generator=generator) * scale


def expected(items: list) -> np.ndarray:
    rows = [np.zeros((N_TAPS, WIDTH), np.float32) if item is None else vector(item).numpy() for item in items]
    return np.stack(rows)


ITEMS = [None, "red kettle", "blue bowl", "green cup", "steel pan", "oak table"]


def make_cache(cache_dir: Path, items=ITEMS, dtype="float16", encoder=None, modality="text") -> LayerCache:
    fingerprint = (encoder or FakeEncoder()).fingerprint()
    parts = {"encoder": fingerprint, "dtype": dtype, "items": content_digest(items), "n_items": len(items)}
    return LayerCache(cache_dir, modality, parts)


def folders(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


# --- build and load ---------------------------------------------------------------------------


def test_build_then_load_float32_is_exact(tmp_path):
    cache = make_cache(tmp_path, dtype="float32")
    built = cache.build(FakeEncoder(), ITEMS, batch_size=2, progress=False)
    assert built.dtype == np.float32 and built.shape == (len(ITEMS), N_TAPS, WIDTH)
    np.testing.assert_array_equal(built, expected(ITEMS))
    again = make_cache(tmp_path, dtype="float32").load()
    np.testing.assert_array_equal(again, expected(ITEMS))
    assert cache.build_seconds is not None and cache.build_seconds >= 0


def test_build_then_load_float16_within_rounding(tmp_path):
    cache = make_cache(tmp_path)
    cache.build(FakeEncoder(), ITEMS, batch_size=4, progress=False)
    loaded = make_cache(tmp_path).load()
    assert loaded.dtype == np.float16
    np.testing.assert_allclose(loaded.astype(np.float32), expected(ITEMS), rtol=1e-3, atol=1e-4)


def test_load_is_a_read_only_memmap(tmp_path):
    cache = make_cache(tmp_path)
    cache.build(FakeEncoder(), ITEMS, progress=False)
    states = cache.load()
    assert isinstance(states, np.memmap)
    with pytest.raises(ValueError):
        states[1, 0, 0] = 1.0


def test_padding_row_is_zero_and_never_encoded(tmp_path):
    encoder = FakeEncoder()
    states = make_cache(tmp_path).build(encoder, ITEMS, batch_size=2, progress=False)
    assert not np.any(states[0])
    assert None not in encoder.seen and encoder.seen == ITEMS[1:]
    assert encoder.calls == 3  # 5 real items in batches of 2


def test_numpy_output_and_meta_contents(tmp_path):
    cache = make_cache(tmp_path, dtype="float32")
    cache.build(lambda batch: np.stack([vector(t).numpy() for t in batch]), ITEMS, progress=False)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["key"] == cache.key and meta["shape"] == [len(ITEMS), N_TAPS, WIDTH] and meta["dtype"] == "float32"
    assert meta["key_parts"]["encoder"]["taps"] == [0, 2, 4] and meta["n_encoded"] == len(ITEMS) - 1
    assert "created" in meta and meta["build_seconds"] >= 0
    assert cache.path.parent == tmp_path and cache.path.name == f"text-{cache.key[:20]}"


def recording_factory():
    """An encoder factory that keeps every encoder it makes (to count builds and calls)."""
    made = []

    def factory():
        made.append(FakeEncoder())
        return made[-1]

    return made, factory


def test_second_load_does_not_call_the_factory(tmp_path):
    made, factory = recording_factory()

    first = make_cache(tmp_path)
    first.load_or_build(factory, ITEMS, progress=False)
    assert first.built is True and len(made) == 1 and made[0].calls > 0

    second = make_cache(tmp_path)
    states = second.load_or_build(factory, ITEMS, progress=False)
    assert second.built is False and len(made) == 1
    assert isinstance(states, np.memmap)


def test_rebuild_true_rebuilds(tmp_path):
    made, factory = recording_factory()

    make_cache(tmp_path).load_or_build(factory, ITEMS, progress=False)
    cache = make_cache(tmp_path)
    cache.load_or_build(factory, ITEMS, rebuild=True, progress=False)
    assert cache.built is True and len(made) == 2 and made[1].calls > 0
    assert folders(tmp_path) == [cache.path.name]


# --- keys ------------------------------------------------------------------------------------


def test_key_is_stable_when_nothing_changes(tmp_path):
    assert make_cache(tmp_path).key == make_cache(tmp_path).key
    assert cache_key({"a": 1, "b": {"y": 2, "x": [1, 2]}}) == cache_key({"b": {"x": [1, 2], "y": 2}, "a": 1})
    assert content_digest(["a", None, "b"]) == content_digest(["a", None, "b"])


def test_key_changes_with_text_dtype_and_taps(tmp_path):
    base = make_cache(tmp_path).key
    changed_text = ITEMS[:2] + ["blue bowl!"] + ITEMS[3:]
    assert make_cache(tmp_path, items=changed_text).key != base
    assert make_cache(tmp_path, dtype="float32").key != base
    assert make_cache(tmp_path, modality="image").key != base

    class OtherTaps(FakeEncoder):
        def fingerprint(self):
            return {**super().fingerprint(), "taps": [0, 1, 4]}

    assert make_cache(tmp_path, encoder=OtherTaps()).key != base


def test_digest_is_order_and_boundary_sensitive():
    assert content_digest(["ab", "c"]) != content_digest(["a", "bc"])
    assert content_digest(["a", "b"]) != content_digest(["b", "a"])
    assert content_digest([None]) != content_digest([""])


def test_key_changes_with_image_bytes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8 first bytes")
    (images / "b.jpg").write_bytes(b"\xff\xd8 other bytes")
    items = [None, images / "a.jpg", images / "b.jpg"]
    before = make_cache(tmp_path / "cache", items=items, modality="image").key
    assert make_cache(tmp_path / "cache", items=items, modality="image").key == before
    (images / "b.jpg").write_bytes(b"\xff\xd8 other bytes, edited")
    assert make_cache(tmp_path / "cache", items=items, modality="image").key != before


def test_digest_of_missing_file_names_it(tmp_path):
    with pytest.raises(CacheError, match="gone.jpg"):
        content_digest([tmp_path / "gone.jpg"])


def test_bad_dtype_names_cache_dtype(tmp_path):
    with pytest.raises(CacheError, match="cache_dtype"):
        make_cache(tmp_path, dtype="bfloat16")
    with pytest.raises(CacheError, match="cache_dtype"):
        make_cache(tmp_path).build(FakeEncoder(), ITEMS, dtype="float32", progress=False)


def test_fp16_overflow_asks_for_float32(tmp_path):
    with pytest.raises(CacheError, match="cache_dtype: float32"):
        make_cache(tmp_path).build(FakeEncoder(scale=1e6), ITEMS, progress=False)
    assert folders(tmp_path) == []


# --- atomicity and recovery ----------------------------------------------------------------------


def test_exception_mid_build_leaves_nothing_and_next_build_works(tmp_path):
    cache = make_cache(tmp_path)
    with pytest.raises(RuntimeError, match="crashed"):
        cache.build(FakeEncoder(fail_on_call=2), ITEMS, batch_size=2, progress=False)
    assert not cache.exists()
    assert folders(tmp_path) == []  # neither the final folder nor the temp folder remains
    cache.build(FakeEncoder(), ITEMS, batch_size=2, progress=False)
    assert cache.exists()
    np.testing.assert_allclose(cache.load().astype(np.float32), expected(ITEMS), rtol=1e-3, atol=1e-4)


def test_leftover_tmp_folder_is_never_read_and_is_cleaned(tmp_path):
    good = make_cache(tmp_path, dtype="float32")
    good.build(FakeEncoder(), ITEMS, progress=False)
    # What a killed build leaves: a complete-looking folder under a .tmp- name (a dead pid on this host).
    leftover = tmp_path / f".tmp-{good.path.name}-junk"
    os.replace(good.path, leftover)
    fresh = make_cache(tmp_path, dtype="float32")
    assert not fresh.exists()
    with pytest.raises(CacheError, match="no valid layer cache"):
        fresh.load()
    fresh.build(FakeEncoder(), ITEMS, progress=False)
    assert fresh.exists() and folders(tmp_path) == [fresh.path.name]


def test_corrupt_meta_is_invalid_and_rebuilt(tmp_path):
    made, factory = recording_factory()

    cache = make_cache(tmp_path)
    cache.build(FakeEncoder(), ITEMS, progress=False)
    meta = cache.path / "meta.json"
    meta.write_text(meta.read_text()[:25])  # half-written
    assert not make_cache(tmp_path).exists()
    again = make_cache(tmp_path)
    again.load_or_build(factory, ITEMS, progress=False)
    assert again.built is True and len(made) == 1 and again.exists()


def test_folder_with_other_key_or_wrong_states_is_invalid(tmp_path):
    cache = make_cache(tmp_path, dtype="float32")
    cache.build(FakeEncoder(), ITEMS, progress=False)
    meta_path = cache.path / "meta.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "key": "0" * 64}))
    assert not cache.exists()

    meta_path.write_text(json.dumps({**meta, "shape": [len(ITEMS) + 1, N_TAPS, WIDTH]}))
    assert not cache.exists()

    meta_path.write_text(json.dumps(meta))
    assert cache.exists()
    states = cache.path / "states.npy"
    states.write_bytes(states.read_bytes()[:-8])  # truncated
    assert not cache.exists()


def test_wrong_encoder_output_shape_is_an_error(tmp_path):
    with pytest.raises(CacheError, match="expected \\[batch, n_taps, width\\]"):
        make_cache(tmp_path).build(lambda batch: torch.zeros(len(batch), WIDTH), ITEMS, progress=False)
    assert folders(tmp_path) == []


def test_cached_rows_must_match_items(tmp_path):
    # Key parts that do not describe the items are the caller's bug: say so, do not serve wrong rows.
    parts = {"encoder": {"name": "fake"}, "dtype": "float16"}
    LayerCache(tmp_path, "text", parts).build(FakeEncoder(), ITEMS, progress=False)
    with pytest.raises(CacheError, match="holds 6 rows for 3 items"):
        LayerCache(tmp_path, "text", parts).load_or_build(FakeEncoder, ITEMS[:3], progress=False)


def test_live_builders_tmp_folder_is_left_alone(tmp_path):
    from recbole_iisan.data.cache import _host_tag

    live = tmp_path / f".tmp-text-abc-{_host_tag()}-{os.getpid()}-x1y2"
    dead = tmp_path / f".tmp-text-abc-{_host_tag()}-{2**30 + 7}-x1y2"  # above any pid_max
    live.mkdir()
    dead.mkdir()
    make_cache(tmp_path).build(FakeEncoder(), ITEMS, progress=False)
    assert live.exists() and not dead.exists()


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    make_cache(tmp_path).build(FakeEncoder(), ITEMS, batch_size=2, desc="encoding toy text")
    assert "encoding toy text" in capsys.readouterr().err
