"""Houlsby adapters (Houlsby et al., 2019) inside every backbone layer; the backbone stays frozen.

An adapter is a residual bottleneck, x + W_up(act(W_down(x))) with W_down: w -> r
(r = ``adapter_size``), started near the identity (weights normal(0, 0.01), biases zero:
the same block as IISAN's SAN, see ``layers.SANBlock``). Unlike IISAN's side networks
they sit *inside* the backbone, so the gradient still flows back through every layer.

Sites, two per transformer layer: after the attention output projection and after the
feed-forward output projection, before the residual add (and, in post-LN models, the
LayerNorm). They are found by module name inside the layer stack (``layer.N.`` /
``layers.N.``): BERT ``attention.output.dense`` and ``output.dense``; ViT / DINOv2
``o_proj`` and ``mlp.fc2``; Llama / Qwen ``o_proj`` and ``down_proj``; CLIP / SigLIP
``out_proj`` and ``fc2``. For EfficientNet-Lite0 an adapter follows each MBConv block's
projection (``_project_conv`` then ``_bn2``), over its output channels, before the
block's skip connection.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from recbole_iisan.data.encoders import CNNImageEncoder, FrozenEncoder
from recbole_iisan.model.layers import SANBlock
from recbole_iisan.model.mm_base import MMBaseline

# The modules an adapter follows, per layer one attention and one FFN output projection:
# names ending in ".output.dense" (BERT: attention.output.dense, output.dense) or whose last
# part is one of TRANSFORMER_SITE_LEAVES, inside the layer stack (not, e.g., SigLIP's pooling head).
TRANSFORMER_SITE_LEAVES = ("o_proj", "out_proj", "fc2", "down_proj")
_IN_LAYER_STACK = re.compile(r"(^|\.)layers?\.\d+\.")
CNN_SITE = "_bn2"  # MBConv: _project_conv then _bn2, then the skip connection


class Adapted(nn.Module):
    """``inner`` followed by ``adapter`` on its output (replaces ``inner`` in its parent)."""

    def __init__(self, inner: nn.Module, adapter: nn.Module):
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.inner(*args, **kwargs))


class ChannelAdapter(nn.Module):
    """A bottleneck adapter over the channels of a [B, C, H, W] feature map."""

    def __init__(self, channels: int, adapter_size: int, activation: str):
        super().__init__()
        self.block = SANBlock(channels, adapter_size, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.movedim(1, -1)).movedim(-1, 1)


def adapter_sites(encoder: FrozenEncoder) -> list[str]:
    """Qualified names of the backbone modules an adapter follows."""
    names = [n for n, _ in encoder.backbone.named_modules()]
    if isinstance(encoder, CNNImageEncoder):
        return [n for n in names if n.startswith("_blocks.") and n.endswith("." + CNN_SITE)]
    sites = [n for n, m in encoder.backbone.named_modules()
             if isinstance(m, nn.Linear) and _IN_LAYER_STACK.search(n)
             and (n.endswith(".output.dense") or n.rsplit(".", 1)[-1] in TRANSFORMER_SITE_LEAVES)]
    expected = 2 * encoder.n_layers
    if len(sites) != expected:
        raise ValueError(
            f"MMAdapter: {encoder.modality}_encoder '{encoder.name}' ({type(encoder.backbone).__name__}) has "
            f"{len(sites)} attention/FFN output projections (modules *.output.dense or "
            f"{' / '.join(TRANSFORMER_SITE_LEAVES)} inside layer.N), expected {expected} (2 per layer): "
            "MMAdapter does not know where this model class's layers end")
    return sites


def _width_of(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    raise TypeError(f"MMAdapter: cannot tell the output width of {type(module).__name__}")


def add_adapters(encoder: FrozenEncoder, adapter_size: int, activation: str = "relu") -> list[str]:
    """Insert an adapter after every site; only adapters train. Returns the site names."""
    for p in encoder.backbone.parameters():
        p.requires_grad_(False)
    sites = adapter_sites(encoder)
    channels_first = isinstance(encoder, CNNImageEncoder)
    device = encoder.device
    for name in sites:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.backbone.get_submodule(parent_name) if parent_name else encoder.backbone
        inner = getattr(parent, child)
        width = _width_of(inner)
        adapter = (ChannelAdapter(width, adapter_size, activation) if channels_first
                   else SANBlock(width, adapter_size, activation))
        setattr(parent, child, Adapted(inner, adapter.to(device)))
    return sites


class MMAdapter(MMBaseline):
    def adapt_backbone(self, encoder: FrozenEncoder, modality: str) -> None:
        add_adapters(encoder, self.config["adapter_size"], self.config["adapter_activation"] or "relu")
