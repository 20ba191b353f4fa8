"""Frozen backbones: the item head over fixed last-layer features, no backbone in memory.

The features are the last tap of the layer cache IISANVersa trains on (the same files:
with default taps, group layer-dropping always keeps the last layer), so a run of this
baseline after an IISANVersa run encodes nothing. Only the item head and the user
encoder train; the backbones' parameters still count in ``total_params``.
"""
from __future__ import annotations

import numpy as np
import torch

from recbole_iisan.model.mm_base import MMBaseline


class MMFrozen(MMBaseline):
    holds_backbones = False
    tunes_backbone = False

    def prepare_cached_features(self) -> dict[str, int]:
        widths = {}
        for m in self.modalities:
            spec = self.item_side.spec(m)
            if spec.taps[-1] != spec.n_layers - 1:
                raise ValueError(
                    f"MMFrozen reads the last layer from the layer cache, but {m}_taps {list(spec.taps)} of "
                    f"{m}_encoder '{spec.name}' end before its last layer {spec.n_layers - 1}: "
                    f"add {spec.n_layers - 1} to {m}_taps or leave it ~ (group layer-dropping)")
            width = spec.tap_widths[-1]
            states = self.item_side.layer_states(m)  # [n_items, n_taps, widest], memory-mapped
            last = np.ascontiguousarray(states[:, -1, :width], dtype=np.float32)
            # Not persistent: the cache is the source of truth, checkpoints stay small.
            self.register_buffer(f"features_{m}", torch.from_numpy(last), persistent=False)
            widths[m] = width
        return widths

    def item_features(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"features_{modality}")[ids]
