"""IISAN-Versa: side-adapted networks over frozen text and image encoders (arXiv 2411.02992).

Per item, the frozen backbones' tapped layer states (read from the layer cache, or
computed per batch with ``use_cache: false``) pass through

- an intra-modal SAN per modality: h_k = SAN_k(g_k * H[k] + (1 - g_k) * h_{k-1});
- an inter-modal SAN over the raw states of both modalities, with dimension
  transformation alignment (DTL) from the wider to the narrower width when they differ;
- heads to the recommendation width and a linear fusion of [image, text, inter].

A SASRec-style Transformer turns the item sequence into user states, trained with
IISAN's in-batch softmax (logQ-corrected) or RecBole's CE / BPR. No gradient reaches a
backbone, so training touches only these small networks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recbole_iisan.model.base import ContentSequentialRecommender
from recbole_iisan.model.layers import InterModalSAN, IntraModalSAN, TapAlignment, align_tap_counts

MODES = ("intra_inter", "intra", "inter", "text", "image")


def _head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim))


class IISANVersa(ContentSequentialRecommender):
    # Heads: IISAN-Versa maps each intra SAN straight to d (Linear(width, d), Linear(d, d));
    # the original IISAN keeps the backbone width first (Linear(width, width), Linear(width, d)).
    wide_intra_heads = False

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.mode = config["modality"] or "intra_inter"
        if self.mode not in MODES:
            raise ValueError(f"modality '{self.mode}' is not one of {', '.join(MODES)} for {type(self).__name__}")
        self.use_cache = bool(config["use_cache"])
        d = self.embedding_size
        specs = {m: self.item_side.spec(m) for m in self.modalities}
        self.specs = specs
        adapter = dict(adapter_size=config["adapter_size"], activation=config["adapter_activation"],
                       fusion_method=config["fusion_method"])

        # Taps of unequal width within a modality (CNN stages) are mapped to its width.
        self.tap_alignment = nn.ModuleDict({
            m: TapAlignment(s.tap_widths, s.width) for m, s in specs.items()
            if len(set(s.tap_widths)) > 1
        })
        self.intra = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        intra_modalities = {"intra_inter": ("text", "image"), "intra": ("text", "image"),
                            "text": ("text",), "image": ("image",)}.get(self.mode, ())
        for m in intra_modalities:
            width = specs[m].width
            self.intra[m] = IntraModalSAN(specs[m].n_taps, width, **adapter)
            hidden = width if self.wide_intra_heads else d
            self.heads[m] = _head(width, hidden, d)
        self.inter = None
        if self.mode in ("intra_inter", "inter"):
            text_taps, image_taps = specs["text"].n_taps, specs["image"].n_taps
            self.inter_slices = align_tap_counts(text_taps, image_taps)
            self.inter = InterModalSAN(min(text_taps, image_taps), specs["text"].width,
                                       specs["image"].width, **adapter)
            self.heads["inter"] = _head(self.inter.dim, self.inter.dim, d)
        n_parts = len(self.heads)
        self.fusion = nn.Linear(n_parts * d, d) if n_parts > 1 else None

        # The frozen item side: the memory-mapped layer cache, or the backbones themselves.
        self._states: dict[str, np.ndarray | torch.Tensor] = {}
        for m in self.modalities:
            if self.use_cache:
                self._states[m] = self.item_side.layer_states(m)
            else:
                self.encoders[m] = self.item_side.load_encoder(m, device="cpu")

    def _layer_states(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        """[U, n_taps, width] float32 states of the (sorted, unique) ids."""
        device = ids.device
        if self.use_cache:
            states = self._states[modality]
            if isinstance(states, np.ndarray):
                if device.type == "cuda" and self.config["cache_on_device"]:
                    # A GPU holds the whole cache easily (20k items x 7 taps x 768 x fp16 =
                    # 215 MB); one upload beats a host gather per batch.
                    states = torch.from_numpy(np.ascontiguousarray(states)).to(device)
                    self._states[modality] = states
                else:
                    rows = np.take(states, ids.cpu().numpy(), axis=0)
                    return torch.from_numpy(rows).to(device=device, dtype=torch.float32)
            return states[ids].float()
        spec = self.specs[modality]
        out = torch.zeros(len(ids), spec.n_taps, spec.width, device=device)
        real = ids != 0  # the padding item has no content; its embedding is never used
        if bool(real.any()):
            raw = self.item_side.raw_batch(modality, ids[real].tolist())
            out[real] = self.encoders[modality].encode(raw).to(device=device, dtype=torch.float32)
        return out

    def embed_items(self, unique_ids: torch.Tensor) -> torch.Tensor:
        states = {}
        for m in self.modalities:
            s = self._layer_states(m, unique_ids)
            states[m] = self.tap_alignment[m](s) if m in self.tap_alignment else s
        parts = []
        for m in ("image", "text"):
            if m in self.intra:
                parts.append(self.heads[m](self.intra[m](states[m])))
        if self.inter is not None:
            text_slice, image_slice = self.inter_slices
            mixed = self.inter(states["text"][:, text_slice], states["image"][:, image_slice])
            parts.append(self.heads["inter"](mixed))
        return self.fusion(torch.cat(parts, dim=-1)) if self.fusion is not None else parts[0]

    def optimizer_param_groups(self) -> list[dict]:
        """Parameter groups with the original's learning rates where configured.

        ``adapter_learning_rate``: SAN blocks and intra-modal gates; ``text_head_learning_rate``:
        the text head; everything else (user encoder, fusion, heads, inter gates, DTL) uses
        ``learning_rate``. Unset rates fall back to ``learning_rate``.
        """
        base = self.config["learning_rate"]
        rates = {"adapter": self.config["adapter_learning_rate"] or base,
                 "text_head": self.config["text_head_learning_rate"] or base, "base": base}
        groups = {"adapter": [], "text_head": [], "base": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("intra.") or name.startswith("inter.blocks."):
                groups["adapter"].append(p)
            elif name.startswith("heads.text."):
                groups["text_head"].append(p)
            else:
                groups["base"].append(p)
        return [{"params": ps, "lr": rates[g], "name": g} for g, ps in groups.items() if ps]
