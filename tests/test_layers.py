"""recbole_iisan.model.layers: SAN blocks, gated stacks, DTL, user encoder, in-batch loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_iisan.model.layers import (
    InterModalSAN,
    IntraModalSAN,
    SANBlock,
    TapAlignment,
    UserEncoder,
    align_tap_counts,
    count_parameters,
    inbatch_softmax_loss,
    log_popularity,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(12345)


# ---------------------------------------------------------------- SAN block


def test_san_block_init_stats_and_zero_bias():
    block = SANBlock(dim=256, adapter_size=64)
    for linear in (block.down, block.up):
        assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert abs(linear.weight.mean().item()) < 1e-3
        assert torch.count_nonzero(linear.bias) == 0
    assert block.down.weight.shape == (64, 256) and block.up.weight.shape == (256, 64)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in block.modules())


def test_san_block_is_identity_when_up_projection_is_zero():
    block = SANBlock(dim=8, adapter_size=4)
    torch.nn.init.zeros_(block.up.weight)
    x = torch.randn(3, 8)
    assert torch.equal(block(x), x)


def test_san_block_computes_bottleneck_plus_residual():
    for activation, act in (("relu", torch.relu), ("gelu", F.gelu)):
        block = SANBlock(dim=6, adapter_size=3, activation=activation)
        x = torch.randn(2, 6)
        expected = act(x @ block.down.weight.t() + block.down.bias) @ block.up.weight.t() + block.up.bias + x
        torch.testing.assert_close(block(x), expected)
    with pytest.raises(ValueError, match="activation"):
        SANBlock(4, 2, activation="tanh")


# ---------------------------------------------------------------- intra-modal SAN


def test_gates_start_at_exactly_one_half():
    san = IntraModalSAN(n_blocks=7, dim=8, adapter_size=4)
    assert torch.equal(san.gates(), torch.full((7,), 0.5))
    inter = InterModalSAN(n_blocks=3, text_dim=8, image_dim=8, adapter_size=4)
    assert torch.equal(inter.gates(), torch.full((3,), 0.5))


def test_intra_san_matches_hand_loop():
    n_blocks, dim = 4, 6
    san = IntraModalSAN(n_blocks, dim, adapter_size=3)
    with torch.no_grad():
        san.gate_logits.copy_(torch.randn(n_blocks) * 0.2)  # gates away from 0.5
    states = torch.randn(5, n_blocks, dim)

    hidden = torch.zeros(5, dim)
    for k in range(n_blocks):
        g = torch.sigmoid(san.gate_logits[k] / 0.1)
        x = g * states[:, k] + (1 - g) * hidden
        hidden = san.blocks[k].up(torch.relu(san.blocks[k].down(x))) + x
    torch.testing.assert_close(san(states), hidden)


def test_intra_san_add_fusion_has_no_gates_and_sums():
    n_blocks, dim = 3, 4
    san = IntraModalSAN(n_blocks, dim, adapter_size=2, fusion_method="add")
    assert san.gates() is None
    assert not any("gate" in name for name, _ in san.named_parameters())
    states = torch.randn(2, n_blocks, dim)
    hidden = torch.zeros(2, dim)
    for k in range(n_blocks):
        hidden = san.blocks[k](states[:, k] + hidden)
    torch.testing.assert_close(san(states), hidden)


def test_intra_san_rejects_wrong_tap_count():
    san = IntraModalSAN(3, 4, adapter_size=2)
    with pytest.raises(ValueError, match="3 taps"):
        san(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="fusion_method"):
        IntraModalSAN(3, 4, fusion_method="concat")


def test_gradients_reach_gates_and_blocks():
    san = IntraModalSAN(3, 4, adapter_size=2)
    san(torch.randn(2, 3, 4)).sum().backward()
    assert san.gate_logits.grad is not None and torch.count_nonzero(san.gate_logits.grad) > 0
    assert all(p.grad is not None for p in san.parameters())


# ---------------------------------------------------------------- inter-modal SAN and DTL


def _inter_reference(san: InterModalSAN, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    hidden = torch.zeros(text.shape[0], san.dim)
    for k in range(san.n_blocks):
        t, i = text[:, k], image[:, k]
        if san.text_dim > san.image_dim:
            t = san.dtl[k](t)
        elif san.image_dim > san.text_dim:
            i = san.dtl[k](i)
        if san.fusion_method == "gate":
            g = torch.sigmoid(san.gate_logits[k] / 0.1)
            x = hidden + g * i + (1 - g) * t
        else:
            x = hidden + i + t
        hidden = san.blocks[k](x)
    return hidden


@pytest.mark.parametrize(
    "text_dim, image_dim, dtl_in, run_dim",
    [(12, 8, 12, 8), (8, 12, 12, 8), (8, 8, None, 8)],
)
@pytest.mark.parametrize("fusion", ["gate", "add"])
def test_inter_san_dtl_direction_and_formula(text_dim, image_dim, dtl_in, run_dim, fusion):
    n_blocks = 3
    san = InterModalSAN(n_blocks, text_dim, image_dim, adapter_size=4, fusion_method=fusion)
    assert san.dim == run_dim
    if dtl_in is None:
        assert san.dtl is None and san.dtl_on is None
    else:
        assert len(san.dtl) == n_blocks
        assert all(lin.in_features == dtl_in and lin.out_features == run_dim for lin in san.dtl)
        assert san.dtl_on == ("text" if text_dim > image_dim else "image")
    if fusion == "gate":
        with torch.no_grad():
            san.gate_logits.copy_(torch.randn(n_blocks) * 0.2)
    text, image = torch.randn(4, n_blocks, text_dim), torch.randn(4, n_blocks, image_dim)
    out = san(text, image)
    assert out.shape == (4, run_dim)
    torch.testing.assert_close(out, _inter_reference(san, text, image))


def test_inter_san_gate_weights_the_image_state():
    """A gate pushed to 1 means the block sees only m_{k-1} + H_img[k]."""
    san = InterModalSAN(1, text_dim=4, image_dim=4, adapter_size=2)
    with torch.no_grad():
        san.gate_logits.fill_(10.0)  # sigmoid(100) == 1 in float32
    image = torch.randn(2, 1, 4)
    out_a = san(torch.randn(2, 1, 4), image)
    out_b = san(torch.randn(2, 1, 4), image)
    torch.testing.assert_close(out_a, out_b)


# ---------------------------------------------------------------- tap alignment


@pytest.mark.parametrize(
    "n_text, n_image, expected",
    [
        (9, 7, (slice(2, 9), slice(0, 7))),
        (7, 9, (slice(0, 7), slice(2, 9))),
        (7, 7, (slice(0, 7), slice(0, 7))),
        (1, 5, (slice(0, 1), slice(4, 5))),
    ],
)
def test_align_tap_counts(n_text, n_image, expected):
    assert align_tap_counts(n_text, n_image) == expected
    text_slice, image_slice = expected
    assert len(range(n_text)[text_slice]) == len(range(n_image)[image_slice]) == min(n_text, n_image)


def test_align_tap_counts_rejects_empty():
    with pytest.raises(ValueError):
        align_tap_counts(0, 3)


def test_tap_alignment_identity_for_equal_widths():
    align = TapAlignment([8, 8, 8], out_width=8)
    assert count_parameters(align) == 0
    states = torch.randn(2, 3, 8)
    assert torch.equal(align(states), states)


def test_tap_alignment_slices_padded_taps():
    widths, out_width = [3, 5, 4], 4
    align = TapAlignment(widths, out_width)
    assert isinstance(align.maps[2], torch.nn.Identity)
    assert align.maps[0].in_features == 3 and align.maps[1].in_features == 5
    states = torch.randn(2, 3, 5)
    # Garbage beyond a tap's width must be ignored, not just zeros.
    noisy = states.clone()
    for k, w in enumerate(widths):
        noisy[:, k, w:] = 99.0
    out = align(noisy)
    assert out.shape == (2, 3, out_width)
    torch.testing.assert_close(out[:, 0], align.maps[0](states[:, 0, :3]))
    torch.testing.assert_close(out[:, 1], align.maps[1](states[:, 1, :5]))
    torch.testing.assert_close(out[:, 2], states[:, 2, :4])
    # Linear taps have no activation: the map is affine.
    zero = align(torch.zeros(1, 3, 5))
    torch.testing.assert_close(align(2 * states) - zero, 2 * (align(states) - zero))
    assert count_parameters(align) == (3 * 4 + 4) + (5 * 4 + 4)


# ---------------------------------------------------------------- parameter counts


def test_count_parameters_closed_forms():
    k, d, r = 7, 24, 8
    per_block = 2 * d * r + r + d
    assert count_parameters(SANBlock(d, r)) == per_block
    assert count_parameters(IntraModalSAN(k, d, r)) == k * per_block + k
    assert count_parameters(IntraModalSAN(k, d, r, fusion_method="add")) == k * per_block
    assert count_parameters(InterModalSAN(k, d, d, r)) == k * per_block + k
    wide = 40
    dtl = k * (wide * d + d)
    assert count_parameters(InterModalSAN(k, wide, d, r)) == k * per_block + k + dtl
    assert count_parameters(InterModalSAN(k, d, wide, r)) == k * per_block + k + dtl


def test_count_parameters_trainable_only():
    san = IntraModalSAN(2, 4, 2)
    total = count_parameters(san)
    san.blocks[0].requires_grad_(False)
    assert count_parameters(san) == total - (2 * 4 * 2 + 2 + 4)
    assert count_parameters(san, trainable_only=False) == total


def test_bert_vit_base_san_size_matches_paper():
    """IISAN on BERT-base + ViT-base: two intra SANs + one inter SAN, 7 blocks, r = 64."""
    sans = [IntraModalSAN(7, 768), IntraModalSAN(7, 768), InterModalSAN(7, 768, 768)]
    total = sum(count_parameters(s) for s in sans)
    assert total == 3 * (7 * (2 * 768 * 64 + 64 + 768) + 7)
    assert 2.0e6 < total < 2.15e6  # METHOD.md: SANs about 2.08 M


# ---------------------------------------------------------------- user encoder


def _encoder() -> UserEncoder:
    return UserEncoder(dim=8, n_layers=2, n_heads=2, max_len=5, dropout=0.1).eval()


def test_user_encoder_shape_and_init():
    enc = _encoder()
    out = enc(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool))
    assert out.shape == (3, 5, 8)
    linears = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6  # q, k, v, out, ffn in, ffn out per layer
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    ffn_in = enc.layers[0].ffn[0]
    assert ffn_in.out_features == 32  # 4 * dim by default
    expected_std = math.sqrt(2.0 / (8 + 32))  # xavier normal
    assert ffn_in.weight.std().item() == pytest.approx(expected_std, rel=0.35)
    with pytest.raises(ValueError, match="UserEncoder"):
        enc(torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool))


def test_user_encoder_is_causal():
    enc = _encoder()
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    changed = x.clone()
    changed[:, 3] = torch.randn(2, 8)
    a, b = enc(x, mask), enc(changed, mask)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_user_encoder_ignores_padded_positions():
    enc = _encoder()
    x = torch.randn(2, 5, 8)
    # Right padding (RecBole style) and, to exercise the padding mask itself, left padding.
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    changed = x.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 5
    a, b = enc(x, mask), enc(changed, mask)
    torch.testing.assert_close(a[mask], b[mask])


def test_user_encoder_fully_padded_row_has_no_nan():
    enc = _encoder().train()
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = enc(torch.randn(2, 5, 8), mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_user_encoder_accepts_shorter_sequences():
    enc = _encoder()
    assert enc(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)).shape == (2, 3, 8)


# ---------------------------------------------------------------- log popularity


def test_log_popularity_handles_zero_counts_and_pad():
    counts = torch.tensor([7.0, 2.0, 0.0, 1.0])  # pad, item 1, unseen item 2, item 3
    log_pop = log_popularity(counts)
    assert torch.isfinite(log_pop).all()
    # Unseen counts as 1: shares 2/4, 1/4, 1/4 of real items; the pad count is ignored.
    torch.testing.assert_close(log_pop, torch.tensor([0.0, math.log(0.5), math.log(0.25), math.log(0.25)]))


# ---------------------------------------------------------------- in-batch loss


def _hand_batch():
    """B=2, L=2, d=2. User 0: items 5, 7, 5 (repeat). User 1: items 7, 9, pad."""
    seq_items = torch.tensor([[5, 7, 5], [7, 9, 0]])
    user_states = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, -1.0]]], requires_grad=True
    )
    # Columns c0..c5: items 5, 7, 5, 7, 9, pad.
    item_embs = torch.tensor(
        [[[1.0, 2.0], [0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]]],
        requires_grad=True,
    )
    log_pop = torch.zeros(10)
    log_pop[5], log_pop[7], log_pop[9] = math.log(0.5), math.log(0.25), math.log(0.25)
    return user_states, item_embs, seq_items, log_pop


def test_inbatch_loss_hand_computed_value():
    user_states, item_embs, seq_items, log_pop = _hand_batch()
    log2, log4 = math.log(2.0), math.log(4.0)
    # Row (0,0) u=[1,0] -> item 7 at c1. User 0 holds 5 and 7: c0, c2 (5), c3 (user 1's 7)
    # masked, c5 pad masked; left: c1 (0 + log4) and c4 (-1 + log4).
    row00 = math.log(math.exp(log4) + math.exp(-1 + log4)) - log4
    # Row (0,1) u=[0,1] -> item 5 at c2 (own positive, the other 5 at c0 masked): c2 (0 + log2), c4 (1 + log4).
    row01 = math.log(math.exp(log2) + math.exp(1 + log4)) - log2
    # Row (1,0) u=[1,1] -> item 9 at c4. User 1 holds 7, 9: c1, c3 masked; c5 pad masked;
    # left: c0 (3 + log2), c2 (2 + log2), c4 (0 + log4).
    row10 = math.log(math.exp(3 + log2) + math.exp(2 + log2) + math.exp(log4)) - log4
    # Row (1,1) targets the pad: excluded.
    expected = (row00 + row01 + row10) / 3
    loss = inbatch_softmax_loss(user_states, item_embs, seq_items, log_pop)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert row00 == pytest.approx(math.log(1 + math.exp(-1)))  # sanity of the hand algebra


def test_inbatch_loss_logq_correction_changes_value():
    user_states, item_embs, seq_items, log_pop = _hand_batch()
    with_q = inbatch_softmax_loss(user_states, item_embs, seq_items, log_pop)
    without_q = inbatch_softmax_loss(user_states, item_embs, seq_items, torch.zeros(10))
    # Without logQ, row (0,1) is log(1 + e), row (1,0) log(e^3 + e^2 + 1), row (0,0) unchanged.
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e) + math.log(math.exp(3) + math.exp(2) + 1)) / 3
    assert without_q.item() == pytest.approx(expected, rel=1e-6)
    assert with_q.item() != pytest.approx(without_q.item())


def _reference_loss(user_states, item_embs, seq_items, log_pop, mask_value=-1e4):
    """Explicit per-row loop of the definition."""
    batch, length, dim = user_states.shape
    width = length + 1
    cols = item_embs.reshape(-1, dim)
    col_items = seq_items.reshape(-1).tolist()
    losses = []
    for b in range(batch):
        user_items = set(seq_items[b].tolist())
        for t in range(length):
            if seq_items[b, t + 1].item() == 0:
                continue
            positive = b * width + t + 1
            logits = []
            for j, item in enumerate(col_items):
                value = user_states[b, t] @ cols[j] - log_pop[item]
                if item == 0 or (item in user_items and j != positive):
                    value = torch.tensor(mask_value)
                logits.append(value)
            logits = torch.stack(logits)
            losses.append(torch.logsumexp(logits, 0) - logits[positive])
    return torch.stack(losses).mean()


def test_inbatch_loss_matches_loop_reference_on_random_batch():
    batch, length, dim, n_items = 4, 5, 3, 8  # few items: many in-batch repeats
    seq_items = torch.randint(1, n_items, (batch, length + 1))
    seq_items[1, 4:] = 0
    seq_items[2, 2:] = 0
    seq_items[3, 1:] = 0  # a single item: no valid row for this user
    user_states = torch.randn(batch, length, dim)
    item_embs = torch.randn(batch, length + 1, dim)
    log_pop = log_popularity(torch.randint(0, 20, (n_items,)))
    loss = inbatch_softmax_loss(user_states, item_embs, seq_items, log_pop)
    torch.testing.assert_close(loss, _reference_loss(user_states, item_embs, seq_items, log_pop))


def test_inbatch_loss_gradients_flow():
    user_states, item_embs, seq_items, log_pop = _hand_batch()
    inbatch_softmax_loss(user_states, item_embs, seq_items, log_pop).backward()
    assert user_states.grad is not None and item_embs.grad is not None
    # Excluded row (1,1) and the pad column get no gradient; used ones do.
    assert torch.count_nonzero(user_states.grad[1, 1]) == 0
    assert torch.count_nonzero(item_embs.grad[1, 2]) == 0
    assert torch.count_nonzero(user_states.grad[0, 0]) > 0
    assert torch.count_nonzero(item_embs.grad[1, 1]) > 0


def test_inbatch_loss_all_padded_targets_is_zero_not_nan():
    user_states = torch.randn(2, 2, 3, requires_grad=True)
    item_embs = torch.randn(2, 3, 3)
    seq_items = torch.tensor([[4, 0, 0], [2, 0, 0]])
    loss = inbatch_softmax_loss(user_states, item_embs, seq_items, torch.zeros(5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(user_states.grad) == 0


def test_inbatch_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="item_embs"):
        inbatch_softmax_loss(torch.randn(2, 2, 3), torch.randn(2, 2, 3), torch.ones(2, 3, dtype=torch.long), torch.zeros(3))
