"""BitFit: only the backbones' bias terms train (Ben Zaken et al., 2022).

Every parameter named ``bias`` counts: linear and LayerNorm biases in a transformer; in
the CNN, whose convolutions mostly have no bias, that is the BatchNorm shifts.
"""
from torch import nn

from recbole_iisan.data.encoders import FrozenEncoder
from recbole_iisan.model.mm_base import MMBaseline


def train_biases_only(backbone: nn.Module) -> int:
    """Make exactly the bias parameters trainable; returns how many scalars that is."""
    count = 0
    for name, p in backbone.named_parameters():
        is_bias = name.rsplit(".", 1)[-1] == "bias"
        p.requires_grad_(is_bias)
        count += p.numel() if is_bias else 0
    return count


class MMBitFit(MMBaseline):
    def adapt_backbone(self, encoder: FrozenEncoder, modality: str) -> None:
        if not train_biases_only(encoder.backbone):
            raise ValueError(f"MMBitFit: {modality}_encoder '{encoder.name}' "
                             f"({type(encoder.backbone).__name__}) has no bias parameters")
