"""The paper's baselines on one multimodal item pipeline: what they share.

Every baseline embeds an item from the last layer of each backbone ("CLS": the pooled
last-layer state with the encoder's configured pooling, e.g. mean pooling for MiniLM,
the CLS token for BERT/ViT, global average pooling of the last block for the CNN):

    item = Linear(2d, d)( concat[ GELU(Linear(image_cls -> d)), GELU(Linear(text_cls -> d)) ] )

``modality: text`` or ``image`` keeps one branch and still ends in a Linear (d -> d): a
GELU output is bounded below (>= -0.17), and dot-product scores need embeddings free in
sign, so every modality ends in the same kind of linear map.

The backbones are real modules here (no layer cache): each training batch runs them on
the batch's distinct items, with gradients, so fine-tuning (full, adapters, LoRA, BitFit)
happens end to end. A subclass decides what trains through one hook, ``adapt_backbone``.
The user encoder, losses, evaluation protocol and lean checkpoints are
``ContentSequentialRecommender``'s, exactly as for IISANVersa.
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_iisan.data.encoders import FrozenEncoder
from recbole_iisan.data.items import blank_image
from recbole_iisan.model.base import ContentSequentialRecommender

# Baseline modality -> the backbones it uses, in the order their branches are concatenated.
BASELINE_MODALITIES = {"multimodal": ("image", "text"), "text": ("text",), "image": ("image",)}


def baseline_modality(config, model_name: str) -> str:
    mode = config["modality"] or "multimodal"
    if mode not in BASELINE_MODALITIES:
        raise ValueError(f"{model_name}: modality '{mode}' is not one of {', '.join(BASELINE_MODALITIES)} "
                         "(the IISAN modes intra_inter / intra / inter belong to IISANVersa)")
    return mode


class ItemHead(nn.Module):
    """Linear(concat[GELU(Linear(cls_m -> d)) for each modality m]) -> d."""

    def __init__(self, widths: dict[str, int], dim: int):
        super().__init__()
        self.branches = nn.ModuleDict({m: nn.Sequential(nn.Linear(w, dim), nn.GELU()) for m, w in widths.items()})
        self.out = nn.Linear(len(widths) * dim, dim)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.out(torch.cat([branch(features[m]) for m, branch in self.branches.items()], dim=-1))


def probe_inputs(encoder: FrozenEncoder) -> dict:
    """A one-item input for the encoder: a short text, or a blank image."""
    return encoder.inputs_on_device(["item"] if encoder.modality == "text" else [blank_image()])


def freeze_unreachable(encoder: FrozenEncoder) -> list[str]:
    """Freeze trainable backbone parameters the last tapped state does not depend on.

    BERT's pooler, ViT's final LayerNorm (applied after the hidden states a model returns)
    and the CNN's classifier head run outside the tapped path: left trainable they would be
    counted as trained yet never get a gradient. One probe item through the backbone shows
    which parameters the last tap reaches. Returns the frozen parameter names.
    """
    named = [(n, p) for n, p in encoder.backbone.named_parameters() if p.requires_grad]
    if not named:
        return []
    was_training = encoder.backbone.training
    encoder.backbone.eval()
    with torch.enable_grad():
        last = encoder.tap_states(**probe_inputs(encoder))[:, -1]
        if not last.requires_grad:
            grads = [None] * len(named)
        else:
            grads = torch.autograd.grad(last.sum(), [p for _, p in named], allow_unused=True)
    encoder.backbone.train(was_training)
    frozen = []
    for (name, p), grad in zip(named, grads):
        if grad is None:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


class MMBaseline(ContentSequentialRecommender):
    """A multimodal item pipeline over backbones run per batch; subclasses pick what trains.

    ``holds_backbones``: False for a model fed from the layer cache (MMFrozen).
    ``tunes_backbone``: the backbone is put in train mode with the model (dropout as in
    fine-tuning). BatchNorm statistics always stay frozen, as usual when fine-tuning a CNN
    on small batches; besides, running statistics are buffers, which lean checkpoints leave
    out with the frozen weights, so updated ones would not survive a reload.
    """

    holds_backbones = True
    tunes_backbone = True

    def __init__(self, config, dataset):
        mode = baseline_modality(config, type(self).__name__)  # checked before anything is built
        super().__init__(config, dataset)
        self.mode = mode
        self.modalities = BASELINE_MODALITIES[self.mode]
        if self.holds_backbones:
            for m in self.modalities:
                self.encoders[m] = self._tuned_encoder(m)
            widths = {m: self.encoders[m].tap_widths[-1] for m in self.modalities}
        else:
            widths = self.prepare_cached_features()
        self.head = ItemHead(widths, self.embedding_size)

    # -- the backbones ---------------------------------------------------------------------
    def _tuned_encoder(self, modality: str) -> FrozenEncoder:
        """The modality's encoder, tapping only its last layer, adapted by the subclass."""
        last_layer = self.item_side.spec(modality).n_layers - 1
        encoder = self.item_side.load_encoder(modality, device="cpu", taps=[last_layer])
        self.adapt_backbone(encoder, modality)
        freeze_unreachable(encoder)
        trainable = [(n, p) for n, p in encoder.backbone.named_parameters() if p.requires_grad]
        if self.tunes_backbone and not trainable:
            raise ValueError(f"{type(self).__name__}: nothing of {modality}_encoder '{encoder.name}' "
                             f"({type(encoder.backbone).__name__}) is left to train")
        low_precision = [n for n, p in trainable if p.dtype != torch.float32]
        if low_precision:
            raise ValueError(f"{type(self).__name__} trains {modality}_encoder parameters "
                             f"(e.g. {low_precision[0]}) that are not float32: set {modality}_dtype: float32")
        return encoder

    def adapt_backbone(self, encoder: FrozenEncoder, modality: str) -> None:
        """Make trainable (or insert) what this baseline tunes; everything starts frozen."""
        raise NotImplementedError

    def prepare_cached_features(self) -> dict[str, int]:
        """For models without backbones: set up their features, return each modality's width."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)  # a FrozenEncoder keeps its backbone in eval mode ...
        if self.tunes_backbone:  # ... which a fine-tuned backbone leaves while training
            for encoder in self.encoders.values():
                encoder.backbone.train(mode)
                for module in encoder.backbone.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    # -- items -----------------------------------------------------------------------------
    def item_features(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        """[U, width] last-layer states of the (sorted, unique) ids; the padding row is zeros."""
        encoder = self.encoders[modality]
        width = encoder.tap_widths[-1]
        out = torch.zeros(len(ids), width, device=ids.device)
        real = ids != 0  # the padding item has no content; its embedding is never used
        real_ids = ids[real].tolist()
        if real_ids:
            step = self.config["encode_batch_size"] or len(real_ids)
            chunks = []
            for start in range(0, len(real_ids), step):
                inputs = self.item_side.batch_inputs(modality, real_ids[start:start + step], encoder)
                # Taps are zero-padded to the widest; the last one's real columns come first.
                chunks.append(encoder.tap_states(**inputs)[:, -1, :width])
            out[real] = torch.cat(chunks).to(device=ids.device, dtype=out.dtype)
        return out

    def embed_items(self, unique_ids: torch.Tensor) -> torch.Tensor:
        return self.head({m: self.item_features(m, unique_ids) for m in self.modalities})
