"""Full fine-tuning (FFT): every backbone parameter on the item's path trains.

The paper's most expensive baseline (batch 32, see MMFullFT.yaml): gradients flow through
the whole of each backbone, so memory and time per epoch grow with the backbone.
"""
from recbole_iisan.data.encoders import FrozenEncoder
from recbole_iisan.model.mm_base import MMBaseline


class MMFullFT(MMBaseline):
    def adapt_backbone(self, encoder: FrozenEncoder, modality: str) -> None:
        for p in encoder.backbone.parameters():
            p.requires_grad_(True)
