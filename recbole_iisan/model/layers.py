"""The building blocks of IISAN / IISAN-Versa in plain torch (no RecBole here).

- `SANBlock`: the side adapter, y = W_up(act(W_down(x))) + x.
- `IntraModalSAN`: one modality's gated stack over its cached per-layer states.
- `InterModalSAN`: the cross-modal stack, with dimension transformation alignment (DTL)
  when the two backbones differ in width.
- `TapAlignment`, `align_tap_counts`: lining up taps of different widths / counts.
- `UserEncoder`: the SASRec-style Transformer over item embeddings.
- `inbatch_softmax_loss`, `log_popularity`: IISAN's in-batch loss with logQ correction.

Shapes: B batch, K taps (blocks), L sequence length, d widths.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# sigmoid(p / T): a low temperature lets a small change of p move the gate a lot.
GATE_TEMPERATURE = 0.1
SAN_INIT_STD = 0.01
FUSION_METHODS = ("gate", "add")
_FUSION_ALIASES = {"gated": "gate", "gate": "gate", "add": "add"}


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"layers.py: unknown activation {name!r}; expected 'relu' or 'gelu'")


def _fusion(name: str) -> str:
    try:
        return _FUSION_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"layers.py: unknown fusion_method {name!r}; expected one of {FUSION_METHODS}"
        ) from None


def _check_taps(states: torch.Tensor, n_blocks: int, width: int, what: str) -> None:
    if states.dim() < 2 or states.shape[-2] != n_blocks or states.shape[-1] != width:
        raise ValueError(
            f"layers.py: {what} must be [..., {n_blocks} taps, {width}], got {tuple(states.shape)}"
        )


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of `module` (only those with requires_grad by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class SANBlock(nn.Module):
    """Side adapter block: d -> r -> d bottleneck with a residual, no LayerNorm.

    Weights start at normal(0, 0.01) and biases at zero, so the block starts close to
    the identity and the stack initially passes the backbone states through.
    """

    def __init__(self, dim: int, adapter_size: int = 64, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(dim, adapter_size)
        self.act = _activation(activation)
        self.up = nn.Linear(adapter_size, dim)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, mean=0.0, std=SAN_INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) + x


class TapAlignment(nn.Module):
    """Per-tap Linear (no activation) mapping tap k of width in_widths[k] to out_width.

    Taps come zero-padded to the widest one: tap k reads its first in_widths[k] columns.
    A tap already out_width wide passes through unchanged (no parameters).
    """

    def __init__(self, in_widths: list[int], out_width: int):
        super().__init__()
        if not in_widths:
            raise ValueError("layers.py: TapAlignment needs at least one tap width")
        self.in_widths = [int(w) for w in in_widths]
        self.out_width = int(out_width)
        self.max_in = max(self.in_widths)
        self.maps = nn.ModuleList(
            nn.Identity() if w == self.out_width else nn.Linear(w, self.out_width)
            for w in self.in_widths
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[..., K, max_in] (zero-padded) -> [..., K, out_width]."""
        _check_taps(states, len(self.in_widths), self.max_in, "TapAlignment input")
        aligned = [m(states[..., k, :w]) for k, (m, w) in enumerate(zip(self.maps, self.in_widths))]
        return torch.stack(aligned, dim=-2)


class _GatedStack(nn.Module):
    """K SAN blocks plus (for 'gate' fusion) one gate logit per block, initialised at 0."""

    def __init__(self, n_blocks: int, dim: int, adapter_size: int, activation: str, fusion_method: str):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"layers.py: a SAN needs at least one block, got n_blocks={n_blocks}")
        self.n_blocks = n_blocks
        self.fusion_method = _fusion(fusion_method)
        self.blocks = nn.ModuleList(SANBlock(dim, adapter_size, activation) for _ in range(n_blocks))
        # One tensor for all gates keeps them easy to find for their own learning rate.
        self.gate_logits = (
            nn.Parameter(torch.zeros(n_blocks)) if self.fusion_method == "gate" else None
        )

    def gates(self) -> torch.Tensor | None:
        """sigmoid(p_k / 0.1) per block ([K]); None under 'add' fusion."""
        if self.gate_logits is None:
            return None
        return torch.sigmoid(self.gate_logits / GATE_TEMPERATURE)


class IntraModalSAN(_GatedStack):
    """One modality's side network: h_0 = 0; h_k = SAN_k(g_k * H[k] + (1 - g_k) * h_{k-1}).

    'add' fusion uses H[k] + h_{k-1} instead of the gated mix.
    """

    def __init__(
        self,
        n_blocks: int,
        dim: int,
        adapter_size: int = 64,
        activation: str = "relu",
        fusion_method: str = "gate",
    ):
        super().__init__(n_blocks, dim, adapter_size, activation, fusion_method)
        self.dim = dim

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[..., K, dim] tapped backbone states -> h_K [..., dim]."""
        _check_taps(states, self.n_blocks, self.dim, "IntraModalSAN states")
        gates = self.gates()
        hidden = torch.zeros_like(states[..., 0, :])
        for k, block in enumerate(self.blocks):
            tap = states[..., k, :]
            if gates is None:
                mixed = tap + hidden
            else:
                mixed = gates[k] * tap + (1 - gates[k]) * hidden
            hidden = block(mixed)
        return hidden


class InterModalSAN(_GatedStack):
    """Cross-modal side network over the raw backbone states of both modalities.

    m_0 = 0; m_k = SAN_k(m_{k-1} + g_k * H_img[k] + (1 - g_k) * H_txt[k]), where the wider
    modality's state first goes through a per-block Linear to the narrower width (DTL) and
    the stack runs at the narrower width. Equal widths: no DTL (`dtl` is None).
    'add' fusion: m_{k-1} + H_img[k] + H_txt[k] (after DTL).
    """

    def __init__(
        self,
        n_blocks: int,
        text_dim: int,
        image_dim: int,
        adapter_size: int = 64,
        activation: str = "relu",
        fusion_method: str = "gate",
    ):
        run_dim = min(text_dim, image_dim)
        super().__init__(n_blocks, run_dim, adapter_size, activation, fusion_method)
        self.text_dim = text_dim
        self.image_dim = image_dim
        self._dim = run_dim
        if text_dim > image_dim:
            self.dtl_on: str | None = "text"
        elif image_dim > text_dim:
            self.dtl_on = "image"
        else:
            self.dtl_on = None
        wide = max(text_dim, image_dim)
        self.dtl = (
            nn.ModuleList(nn.Linear(wide, run_dim) for _ in range(n_blocks))
            if self.dtl_on is not None
            else None
        )

    @property
    def dim(self) -> int:
        """The width the SAN blocks run at (and of the output): the narrower modality's."""
        return self._dim

    def forward(self, text_states: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """text [..., K, d_text], image [..., K, d_image] -> m_K [..., dim]."""
        _check_taps(text_states, self.n_blocks, self.text_dim, "InterModalSAN text_states")
        _check_taps(image_states, self.n_blocks, self.image_dim, "InterModalSAN image_states")
        gates = self.gates()
        hidden = text_states.new_zeros(*text_states.shape[:-2], self.dim)
        for k, block in enumerate(self.blocks):
            text, image = text_states[..., k, :], image_states[..., k, :]
            if self.dtl_on == "text":
                text = self.dtl[k](text)
            elif self.dtl_on == "image":
                image = self.dtl[k](image)
            if gates is None:
                mixed = hidden + image + text
            else:
                mixed = hidden + gates[k] * image + (1 - gates[k]) * text
            hidden = block(mixed)
        return hidden


def align_tap_counts(n_text: int, n_image: int) -> tuple[slice, slice]:
    """Slices of the text and image taps the inter SAN reads.

    With unequal tap counts the surplus leading taps of the longer modality are seen
    only by its intra SAN; the inter SAN aligns the last min(n_text, n_image) taps.
    """
    if n_text < 1 or n_image < 1:
        raise ValueError(f"layers.py: tap counts must be >= 1, got text={n_text}, image={n_image}")
    shared = min(n_text, n_image)
    return slice(n_text - shared, n_text), slice(n_image - shared, n_image)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"layers.py: dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.out_dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        return x.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: [B, 1, L, L] bool, True where query i may attend to key j."""
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        dropout_p = self.attn_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(x.shape)
        return self.out_dropout(self.out(context))


class _TransformerLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, n_heads: int, inner_size: int, dropout: float, activation: str, eps: float):
        super().__init__()
        self.attention = _SelfAttention(dim, n_heads, dropout)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, inner_size),
            _activation(activation),
            nn.Linear(inner_size, dim),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attention(x, allowed))
        return self.ffn_norm(x + self.ffn(x))


class UserEncoder(nn.Module):
    """SASRec-style Transformer over a user's item embeddings (right-padded sequences).

    Learned position embeddings are added, then LayerNorm and dropout, then post-LN
    Transformer layers. Position i attends to itself and to earlier real positions only.
    Init (as the IISAN code): xavier-normal for Linear weights and the position
    embedding, zero biases, LayerNorm at (1, 0).
    """

    def __init__(
        self,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        max_len: int = 10,
        dropout: float = 0.1,
        inner_size: int | None = None,
        activation: str = "relu",
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.position_embedding = nn.Embedding(max_len, dim)
        self.input_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.input_dropout = nn.Dropout(dropout)
        inner = inner_size if inner_size is not None else 4 * dim
        self.layers = nn.ModuleList(
            _TransformerLayer(dim, n_heads, inner, dropout, activation, layer_norm_eps)
            for _ in range(n_layers)
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_normal_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @staticmethod
    def attention_allowed(padding_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] (True = real item) -> [B, 1, L, L] bool, True where i may attend to j.

        Causal and padding-aware; the diagonal is always allowed so padded (even fully
        padded) rows still have one key and never produce NaN.
        """
        length = padding_mask.shape[1]
        positions = torch.arange(length, device=padding_mask.device)
        causal = positions[None, :] <= positions[:, None]  # [L(query), L(key)]
        diagonal = positions[None, :] == positions[:, None]
        allowed = causal[None] & (padding_mask[:, None, :] | diagonal[None])
        return allowed[:, None]

    def forward(self, item_embs: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """item_embs [B, L, d], padding_mask [B, L] bool (True = real) -> [B, L, d]."""
        batch, length, dim = item_embs.shape
        if length > self.max_len or dim != self.dim:
            raise ValueError(
                f"layers.py: UserEncoder expects [B, <= {self.max_len}, {self.dim}], "
                f"got {tuple(item_embs.shape)}"
            )
        if padding_mask.shape != (batch, length):
            raise ValueError(
                f"layers.py: padding_mask must be [{batch}, {length}], got {tuple(padding_mask.shape)}"
            )
        positions = torch.arange(length, device=item_embs.device)
        x = item_embs + self.position_embedding(positions)[None]
        x = self.input_dropout(self.input_norm(x))
        allowed = self.attention_allowed(padding_mask.bool())
        for layer in self.layers:
            x = layer(x, allowed)
        return x


def log_popularity(counts: torch.Tensor) -> torch.Tensor:
    """log of each item's share of the training interactions, for the logQ correction.

    counts: [n_items] interaction counts indexed by item id, id 0 the padding. Unseen items
    count as 1 so the log stays finite; the share is taken over the real items (ids >= 1);
    the pad entry is 0 (its columns are always masked).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if counts.numel() < 2:
        raise ValueError(f"layers.py: log_popularity needs counts for pad + >= 1 item, got {counts.numel()}")
    counts = counts.clamp(min=1.0)
    log_share = counts.log() - math.log(counts[1:].sum().item())
    log_share[0] = 0.0
    return log_share.float()


def inbatch_softmax_loss(
    user_states: torch.Tensor,
    item_embs: torch.Tensor,
    seq_items: torch.Tensor,
    log_pop: torch.Tensor,
    mask_value: float = -1e4,
) -> torch.Tensor:
    """IISAN's in-batch softmax loss with logQ correction.

    user_states [B, L, d]: state at position t predicts seq_items[:, t + 1].
    item_embs [B, L+1, d]: embeddings of seq_items (right-padded, 0 = padding).
    log_pop [n_items]: log popularity share per item id (see `log_popularity`).
    Rows are the B*L states with a real target; columns all B*(L+1) in-batch items.
    Masked with mask_value: padded columns, and for each row every column whose item occurs
    in that row's user sequence, except the row's own positive column. Returns mean CE.
    """
    batch, length, dim = user_states.shape
    if item_embs.shape != (batch, length + 1, dim) or seq_items.shape != (batch, length + 1):
        raise ValueError(
            "layers.py: inbatch_softmax_loss expects user_states [B, L, d], item_embs [B, L+1, d], "
            f"seq_items [B, L+1]; got {tuple(user_states.shape)}, {tuple(item_embs.shape)}, "
            f"{tuple(seq_items.shape)}"
        )
    width = length + 1
    col_items = seq_items.reshape(-1)  # [B*(L+1)]
    logits = user_states.reshape(-1, dim) @ item_embs.reshape(-1, dim).t()
    logits = logits - log_pop.to(device=logits.device, dtype=logits.dtype)[col_items][None, :]
    logits = logits.view(batch, length, batch * width)

    # [B, B*(L+1)]: column j's item appears somewhere in user b's sequence.
    in_user_seq = (seq_items[:, :, None] == col_items[None, None, :]).any(dim=1)
    masked = in_user_seq[:, None, :] | (col_items == 0)[None, None, :]  # [B, 1, B*(L+1)]
    # The row (b, t)'s own positive is column b*(L+1) + t + 1.
    positive = (
        torch.arange(batch, device=seq_items.device)[:, None] * width
        + torch.arange(1, width, device=seq_items.device)[None, :]
    )  # [B, L]
    own_positive = torch.zeros(
        batch, length, batch * width, dtype=torch.bool, device=seq_items.device
    ).scatter_(2, positive[:, :, None], True)
    logits = logits.masked_fill(masked & ~own_positive, mask_value)

    valid = seq_items[:, 1:] != 0  # [B, L]: the target is a real item
    if not bool(valid.any()):
        # Nothing to predict: a zero that keeps the graph (cross-entropy of no rows is NaN).
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], positive[valid])
