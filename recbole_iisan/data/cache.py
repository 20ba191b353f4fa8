"""The layer cache: frozen-encoder states per item, computed once, memory-mapped after.

This module alone decides cache keys, storage layout and atomicity. A cache is a folder
`<cache_dir>/<modality>-<key[:20]>/` holding `states.npy` ([n_items, n_taps, width])
and `meta.json` (full key, key parts, shape, dtype, timings). It is built inside a
`.tmp-*` folder of cache_dir and renamed into place only when complete, so a reader
sees a whole cache or none.

Concurrency: the build is atomic but not locked. Two processes (e.g. distributed ranks)
building the same key would both encode and the last rename wins; callers should build
on one rank, wait at a barrier, then load on all ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
# Bump when the stored layout or meaning changes, so old caches stop matching.
CACHE_FORMAT = 1
STATES_FILE = "states.npy"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20
# A temp folder from another host cannot be checked for a live owner; assume dead after this.
_FOREIGN_TMP_MAX_AGE_S = 24 * 3600


class CacheError(RuntimeError):
    """The layer cache cannot be built or read as asked."""


def content_digest(items: list) -> str:
    """sha256 over items in order: str by utf-8 text, Path by file bytes, None by a marker.

    Each item is tagged and length-prefixed, so ["ab", "c"] and ["a", "bc"] differ.
    """
    digest = hashlib.sha256()
    for item in items:
        if item is None:
            digest.update(b"N")
        elif isinstance(item, str):
            data = item.encode("utf-8")
            digest.update(b"S%d:" % len(data))
            digest.update(data)
        elif isinstance(item, Path):
            try:
                size = item.stat().st_size
                digest.update(b"F%d:" % size)
                with item.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
            except OSError as exc:
                raise CacheError(f"cannot read {item} to fingerprint the item content: {exc}") from exc
        else:
            raise CacheError(f"content_digest takes str, Path or None items, got {type(item).__name__}")
    return digest.hexdigest()


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    raise CacheError(f"cache key part of type {type(value).__name__} cannot be written canonically: {value!r}")


def _canonical_json(parts: dict) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def cache_key(parts: dict) -> str:
    """sha256 of the canonical JSON of everything that changes the cached content."""
    return hashlib.sha256(_canonical_json(parts).encode("ascii")).hexdigest()


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise CacheError(f"cache_dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return dtype


def _to_numpy(batch) -> np.ndarray:
    """An encoder's output as float32 numpy (bf16 tensors have no numpy dtype)."""
    if isinstance(batch, np.ndarray):
        return batch.astype(np.float32, copy=False)
    if hasattr(batch, "detach"):  # a torch.Tensor; torch is not imported for this alone
        return batch.detach().float().cpu().numpy()
    raise CacheError(f"encode_batch returned {type(batch).__name__}; expected a torch.Tensor or numpy array")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale_tmp(folder: Path) -> bool:
    """Whether a `.tmp-*` folder's builder is gone: same host and dead pid, or old enough."""
    # Names are .tmp-<name>-<host>-<pid>-<random>; anything else is leftover junk.
    pieces = folder.name[len(TMP_PREFIX):].rsplit("-", 3)
    if len(pieces) != 4 or not pieces[2].isdigit():
        return True
    host, pid = pieces[1], int(pieces[2])
    if host == _host_tag():
        return not _pid_alive(pid)
    try:
        return time.time() - folder.stat().st_mtime > _FOREIGN_TMP_MAX_AGE_S
    except OSError:
        return False


def _host_tag() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


class LayerCache:
    """One modality's cached per-layer item states under one content key."""

    def __init__(self, cache_dir: str | Path, modality: str, key_parts: dict):
        if not modality or not all(c.isalnum() or c in "_." for c in modality):
            raise CacheError(f"modality {modality!r} must be a plain name (letters, digits, '_', '.')")
        self.cache_dir = Path(cache_dir).expanduser()
        self.modality = modality
        self.dtype = _check_dtype(key_parts.get("dtype", "float16"))
        self.key_parts = {**key_parts, "dtype": self.dtype, "modality": modality, "cache_format": CACHE_FORMAT}
        self.key = cache_key(self.key_parts)
        self.path = self.cache_dir / f"{modality}-{self.key[:20]}"
        self.build_seconds: float | None = None
        self.built: bool | None = None

    @property
    def states_path(self) -> Path:
        return self.path / STATES_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def read_meta(self) -> dict | None:
        """The folder's meta.json, or None when absent or unreadable (e.g. half-written)."""
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _invalid_reason(self) -> str | None:
        if not self.path.is_dir():
            return "absent"
        meta = self.read_meta()
        if meta is None:
            return f"{self.meta_path} missing or corrupt"
        if meta.get("key") != self.key:
            return f"{self.meta_path} records another key"
        try:
            states = np.load(self.states_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"{self.states_path} unreadable: {exc}"
        if list(states.shape) != meta.get("shape") or str(states.dtype) != meta.get("dtype"):
            recorded = f"{meta.get('dtype')}{meta.get('shape')}"
            return f"{self.states_path} is {states.dtype}{list(states.shape)}, meta.json records {recorded}"
        return None

    def exists(self) -> bool:
        """Whether a complete cache for this exact key is in place."""
        reason = self._invalid_reason()
        if reason is not None and reason != "absent":
            logger.info("layer cache %s is not valid: %s", self.path, reason)
        return reason is None

    def load(self) -> np.ndarray:
        """The states, memory-mapped read-only: [n_items, n_taps, width]."""
        reason = self._invalid_reason()
        if reason is not None:
            raise CacheError(f"no valid layer cache at {self.path}: {reason}")
        return np.load(self.states_path, mmap_mode="r")

    def _clean_stale_tmp(self) -> None:
        if not self.cache_dir.is_dir():
            return
        for folder in self.cache_dir.glob(TMP_PREFIX + "*"):
            if folder.is_dir() and _is_stale_tmp(folder):
                logger.info("removing leftover layer-cache temp folder %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def build(
        self,
        encode_batch: Callable[[list], object],
        items: list,
        batch_size: int = 64,
        dtype: str | None = None,
        progress: bool = True,
        desc: str = "",
    ) -> np.ndarray:
        """Encode every non-None item, store the states atomically, return them memory-mapped.

        Row i holds items[i]'s states; None rows (the padding item) stay zero and are never
        encoded. `dtype` defaults to the key's dtype and must agree with it.
        """
        if dtype is not None and _check_dtype(dtype) != self.dtype:
            raise CacheError(f"cache_dtype={dtype!r} differs from the dtype {self.dtype!r} in this cache's key")
        if batch_size < 1:
            raise CacheError(f"batch_size must be at least 1, got {batch_size}")
        rows = [i for i, item in enumerate(items) if item is not None]
        if not rows:
            raise CacheError(f"no items to encode for the {self.modality} cache ({len(items)} rows, all padding)")

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp()
        tmp = Path(
            tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.path.name}-{_host_tag()}-{os.getpid()}-", dir=self.cache_dir)
        )
        started = time.perf_counter()
        done = False
        try:
            shape = self._write_states(tmp / STATES_FILE, encode_batch, items, rows, batch_size, progress, desc)
            self.build_seconds = time.perf_counter() - started
            meta = {
                "key": self.key,
                "key_parts": self.key_parts,
                "shape": list(shape),
                "dtype": self.dtype,
                "n_encoded": len(rows),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(self.build_seconds, 3),
            }
            meta_file = tmp / META_FILE
            meta_file.write_text(json.dumps(meta, indent=1, sort_keys=True, default=_json_default), encoding="utf-8")
            _fsync_path(meta_file)
            if self.path.exists():  # stale, invalid or being rebuilt: a folder cannot be replaced over
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
            _fsync_path(self.cache_dir)
            done = True
        finally:
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "built %s layer cache %s: %s %s in %.1f s",
            self.modality,
            self.path,
            self.dtype,
            list(shape),
            self.build_seconds,
        )
        return self.load()

    def _write_states(self, target: Path, encode_batch, items, rows, batch_size, progress, desc) -> tuple:
        np_dtype = np.dtype(self.dtype)
        states = None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc=desc or f"encoding {self.modality}", unit="item")
        try:
            for start in range(0, len(rows), batch_size):
                index = rows[start : start + batch_size]
                out = _to_numpy(encode_batch([items[i] for i in index]))
                if out.ndim != 3 or out.shape[0] != len(index):
                    raise CacheError(
                        f"encode_batch returned shape {tuple(out.shape)} for {len(index)} items; "
                        "expected [batch, n_taps, width]"
                    )
                if states is None:
                    # The shape is known only once the encoder has answered.
                    full_shape = (len(items), *out.shape[1:])
                    states = np.lib.format.open_memmap(target, mode="w+", dtype=np_dtype, shape=full_shape)
                    # A new memmap file is zero-filled already; padding rows are zeroed explicitly all the same.
                    padding = [i for i, item in enumerate(items) if item is None]
                    if padding:
                        states[padding] = 0
                elif out.shape[1:] != states.shape[1:]:
                    raise CacheError(f"encode_batch changed its output from {states.shape[1:]} to {out.shape[1:]}")
                if not np.isfinite(out).all():
                    raise CacheError(f"the {self.modality} encoder produced NaN or inf states")
                with np.errstate(over="ignore"):
                    converted = out.astype(np_dtype)
                if not np.isfinite(converted).all():
                    raise CacheError(
                        f"{self.modality} states exceed the {self.dtype} range (|x| up to {np.abs(out).max():.3g}); "
                        "set cache_dtype: float32"
                    )
                states[index] = converted
                if bar is not None:
                    bar.update(len(index))
            states.flush()
            shape = states.shape
        finally:
            if bar is not None:
                bar.close()
            del states  # closes the memory map before the file is synced
        _fsync_path(target)
        return shape

    def load_or_build(
        self,
        encode_batch_factory: Callable[[], Callable[[list], object]],
        items: list,
        rebuild: bool = False,
        **build_kw,
    ) -> np.ndarray:
        """Load a valid cache, else build one; the encoder factory is called only to build."""
        if not rebuild and self.exists():
            states = np.load(self.states_path, mmap_mode="r")
            if states.shape[0] != len(items):
                # The key should cover the item list; a mismatch means the caller's key parts are incomplete.
                raise CacheError(
                    f"layer cache {self.path} holds {states.shape[0]} rows for {len(items)} items; "
                    "its key parts do not describe the items (include n_items and the content digest)"
                )
            self.built = False
            logger.info("loaded %s layer cache %s %s", self.modality, self.path, list(states.shape))
            return states
        logger.info("%s %s layer cache %s", "rebuilding" if rebuild else "building", self.modality, self.path)
        encode_batch = encode_batch_factory()
        try:
            states = self.build(encode_batch, items, **build_kw)
        finally:
            del encode_batch  # drop this reference to the encoder as soon as the cache is written
        self.built = True
        return states
