"""The efficiency meter: parameter counts, peak memory, timings and the paper's TPME score."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def count_parameters(model: torch.nn.Module) -> dict:
    """Trainable and total parameters.

    A model whose frozen backbones are not held in memory (cached training) reports them
    through ``frozen_backbone_parameters()`` so ``total_params`` still counts the whole
    system a user deploys, not just what happens to be loaded.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loaded = sum(p.numel() for p in model.parameters())
    extra = 0
    if hasattr(model, "frozen_backbone_parameters"):
        extra = int(model.frozen_backbone_parameters())
    return {"trainable_params": int(trainable), "total_params": int(loaded + extra)}


def _rss_high_water_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory since the last ``reset()``: CUDA peak allocated on GPU, peak RSS on CPU.

    On Linux writing 5 to /proc/self/clear_refs resets the RSS high-water mark, so several
    runs in one process each get their own peak; where that is refused the figure is the
    process peak so far, and ``resettable`` says so.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.resettable = True

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def reset(self) -> None:
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.resettable = False

    def peak_mb(self) -> float:
        if self.on_cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _rss_high_water_mb()
        return float(peak) if peak is not None else float("nan")


@contextmanager
def stopwatch(record: list):
    """Append the wall seconds of the block to ``record``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record.append(time.perf_counter() - start)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def tpme(rows: list[dict], weights=(0.45, 0.1, 0.45)) -> list[float]:
    """TPME of each method (lower is better): weighted min-max normalised time, params, memory.

    Each row needs ``train_seconds_per_epoch``, ``trainable_params`` and ``peak_memory_mb``.
    A column where every method is equal normalises to 0 for all.
    """
    keys = ("train_seconds_per_epoch", "trainable_params", "peak_memory_mb")

    def normalised(key):
        values = [float(r[key]) for r in rows]
        lo, hi = min(values), max(values)
        return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]

    columns = [normalised(k) for k in keys]
    return [sum(w * col[i] for w, col in zip(weights, columns)) for i in range(len(rows))]
