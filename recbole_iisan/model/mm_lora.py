"""LoRA (Hu et al., 2022) on the backbones' attention query and value projections, with ``peft``.

Each targeted module W gains a trainable low-rank update (lora_alpha / r) * B A, A: r x in,
B: out x r (``lora_r`` = 8 in the paper), B starting at zero so training starts from the
pretrained backbone; the backbone itself stays frozen. The gradient still flows back
through every layer below the topmost target.

Targets (``lora_target_modules``; ~ = chosen from the model's module names): BERT / ViT
style ``query``, ``value``; Llama / Qwen / CLIP / SigLIP style ``q_proj``, ``v_proj``.
EfficientNet-Lite0 has no attention: LoRA goes on each MBConv block's 1x1 projection
convolution ``_project_conv`` (peft supports Conv2d).
"""
from __future__ import annotations

from torch import nn

from recbole_iisan.data.encoders import CNNImageEncoder, FrozenEncoder
from recbole_iisan.model.mm_base import MMBaseline

# Query / value projection names by model family, tried in order.
ATTENTION_TARGETS = (("query", "value"), ("q_proj", "v_proj"))
CNN_TARGETS = ("_project_conv",)


def _matches(name: str, targets) -> bool:
    # peft's rule for a list of target names: the whole name or its last dotted parts.
    return any(name == t or name.endswith("." + t) for t in targets)


def _label(encoder: FrozenEncoder) -> str:
    return f"{encoder.modality}_encoder '{encoder.name}' ({type(encoder.backbone).__name__})"


def lora_targets(encoder: FrozenEncoder, configured=None) -> list[str]:
    """The module names LoRA adapts: ``configured`` (a list, or a dict by modality), else the default."""
    if isinstance(configured, dict):
        configured = configured.get(encoder.modality)
    if configured:
        return [configured] if isinstance(configured, str) else list(configured)
    if isinstance(encoder, CNNImageEncoder):
        return list(CNN_TARGETS)
    leaves = {n.rsplit(".", 1)[-1] for n, m in encoder.backbone.named_modules() if isinstance(m, nn.Linear)}
    for pair in ATTENTION_TARGETS:
        if set(pair) <= leaves:
            return list(pair)
    raise ValueError(f"MMLoRA: {_label(encoder)} has no attention query/value projections named "
                     f"{' or '.join('/'.join(p) for p in ATTENTION_TARGETS)}; "
                     "name the modules to adapt with lora_target_modules")


def _plain_pointwise_convs(backbone: nn.Module, targets) -> None:
    """Swap targeted 1x1 'SAME'-padded convs for plain nn.Conv2d sharing their weights.

    peft builds its LoRA convolutions with the targeted layer's class, and EfficientNet's
    Conv2dStaticSamePadding cannot be built that way; for a 1x1, stride-1 kernel its
    padding is empty, so a plain Conv2d computes exactly the same.
    """
    for name, module in list(backbone.named_modules()):
        if not _matches(name, targets) or type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d):
            continue
        padding = getattr(module, "static_padding", None)
        pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
        if not pointwise or not (padding is None or type(padding).__name__ == "Identity"):
            raise ValueError(f"MMLoRA: cannot adapt {name} ({type(module).__name__}, kernel {module.kernel_size}, "
                             f"stride {module.stride}): only 1x1 convolutions are supported")
        plain = nn.Conv2d(module.in_channels, module.out_channels, 1, groups=module.groups,
                          bias=module.bias is not None)
        plain.weight = module.weight
        plain.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, plain)


def add_lora(encoder: FrozenEncoder, r: int, alpha: float, dropout: float, targets) -> list[str]:
    """Inject peft LoRA layers into the backbone (in place); only they train. Returns their names."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    for p in encoder.backbone.parameters():
        p.requires_grad_(False)
    targets = list(targets)
    _plain_pointwise_convs(encoder.backbone, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, encoder.backbone)
    except ValueError as exc:
        raise ValueError(f"MMLoRA: lora_target_modules {targets} cannot be adapted in {_label(encoder)}: "
                         f"{exc}") from exc
    adapted = [n for n, m in encoder.backbone.named_modules() if isinstance(m, LoraLayer)]
    if not adapted:
        raise ValueError(f"MMLoRA: lora_target_modules {targets} match no module of {_label(encoder)}")
    return adapted


class MMLoRA(MMBaseline):
    def adapt_backbone(self, encoder: FrozenEncoder, modality: str) -> None:
        c = self.config
        add_lora(encoder, c["lora_r"], c["lora_alpha"], c["lora_dropout"],
                 lora_targets(encoder, c["lora_target_modules"]))
