"""DALL-E's sparse masks and the sliding window: each equals its definition written as explicit
loops; the [text; image] stream and DALL-E's layer schedule; the transformer with a mask equals
attention computed query by query over the allowed keys only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformer
from t2i.tokens.masks import MASK_KINDS, image_mask, layer_kinds, stream_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _allowed(kind: str, h: int, w: int, i: int, j: int, causal: bool, k: int) -> bool:
    """Whether token i may attend to token j, from the definitions (module docstring of t2i.tokens.masks)."""
    ri, ci, rj, cj = i // w, i % w, j // w, j % w
    if causal and j > i:
        return False
    if kind == "full":
        return True
    if kind == "row":
        return ri == rj
    if kind == "column":
        return ci == cj
    if kind == "conv":
        return abs(ri - rj) <= k // 2 and abs(ci - cj) <= k // 2
    # window: k x k (at most the map) centred on the token, moved inward where it would leave the map
    r0, c0 = _window_start(ri, h, k), _window_start(ci, w, k)
    return r0 <= rj < r0 + min(k, h) and c0 <= cj < c0 + min(k, w)


def _window_start(p: int, size: int, k: int) -> int:
    k = min(k, size)
    start = p - k // 2
    if start < 0:
        start = 0
    if start + k > size:
        start = size - k
    return start


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("h", "w", "k"), [(4, 4, 3), (5, 6, 3), (6, 6, 4), (3, 5, 7)])
def test_each_mask_equals_its_definition(kind, causal, h, w, k):
    mask = image_mask(kind, h, w, causal=causal, kernel=k)
    n = h * w
    dense = torch.tensor([[_allowed(kind, h, w, i, j, causal, k) for j in range(n)] for i in range(n)])
    assert torch.equal(mask, dense)
    assert mask.diagonal().all()  # no query is left without a key


def test_the_window_keeps_its_size_at_the_borders_and_the_conv_mask_is_cut():
    """Seed 000 sec. 10.1: a border token's window is moved inward and holds k x k tokens; the
    convolutional neighbourhood of a corner token holds only the part inside the map."""
    window, conv = image_mask("window", 8, 8, kernel=3), image_mask("conv", 8, 8, kernel=3)
    assert (window.sum(1) == 9).all()
    assert conv[0].sum() == 4 and conv[9].sum() == 9
    assert window[0].nonzero().flatten().tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18]


def test_stream_mask_lets_image_tokens_see_all_text_and_text_never_the_image():
    image = image_mask("row", 2, 2, causal=True)
    m = stream_mask(image, 3, causal=True)
    assert m.shape == (7, 7)
    assert torch.equal(m[:3, :3], torch.ones(3, 3, dtype=torch.bool).tril())
    assert not m[:3, 3:].any() and m[3:, :3].all() and torch.equal(m[3:, 3:], image)


def test_dalle_layer_schedule_is_column_where_i_minus_2_mod_4_is_0_and_conv_last():
    assert layer_kinds("dalle", 8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_kinds("window", 2) == ["window", "window"]
    with pytest.raises(ValueError, match="attention pattern"):
        layer_kinds("strided", 2)


def _attention_by_query(attn: torch.nn.Module, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of x (1, N, D) where query i reads only the keys allowed[i] (a list of
    their indices), softmax over those keys alone: the reference the masked SDPA must equal."""
    h = attn.heads
    q, k, v = (p(x)[0].unflatten(-1, (h, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))  # (N, H, Dh)
    rows = []
    for i in range(x.shape[1]):
        keys = allowed[i].nonzero().flatten()
        w = torch.einsum("hd,khd->hk", q[i], k[keys]) / q.shape[-1] ** 0.5  # (H, K)
        rows.append(torch.einsum("hk,khd->hd", w.softmax(-1), v[keys]).flatten())  # (H Dh)
    return attn.to_out(torch.stack(rows)[None])


@pytest.mark.parametrize(("pattern", "causal"), [("window", False), ("window", True), ("dalle", True)])
def test_the_network_with_a_mask_equals_attention_restricted_to_the_allowed_keys(pattern, causal):
    """Every block's self-attention rebuilt query by query over its mask's keys: the same hidden
    states (the sliding window on a 6x6 map for MaskGIT's network, DALL-E's schedule for the causal one);
    and the window really restricts (full attention gives other states)."""
    torch.manual_seed(0)
    text = dict(text_vocab=10, text_length=3) if causal else {}
    cfg = dataclasses.replace(TOKEN_TRANSFORMER_PRESETS["tiny"], grid=6, layers=3, context_dim=None, causal=causal,
                              attention=pattern, kernel=3, **text)
    net = TokenTransformer(cfg).eval()
    n = cfg.num_tokens - (1 if causal else 0)
    tokens = torch.randint(0, cfg.num_codes, (1, n))
    ids = torch.randint(0, 10, (1, 3)) if causal else None
    with torch.no_grad():
        ours = net.hidden(tokens, ids)
        x = net.token_embedding(tokens)
        if causal:
            x = torch.cat([net.text_embedding(ids), x], dim=1)
        x = x + net.position[:, : x.shape[1]]
        for block, mask in zip(net.blocks, net.layer_masks(x.device), strict=True):
            s = x.shape[1]
            x = x + _attention_by_query(block.attn, block.norm1(x), mask[:s, :s])
            x = x + block.mlp(block.norm2(x))
        reference = net.norm(x)
        full = TokenTransformer(dataclasses.replace(cfg, attention="full"))
        full.load_state_dict(net.state_dict())
        other = full.hidden(tokens, ids)
    assert (ours - reference).abs().max() < 1e-5
    assert (ours - other).abs().max() > 1e-2


def test_a_token_outside_every_window_of_a_position_does_not_reach_it_in_one_layer():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TOKEN_TRANSFORMER_PRESETS["tiny"], grid=8, layers=1, context_dim=None,
                              attention="window", kernel=3)
    net = TokenTransformer(cfg).eval()
    tokens = torch.randint(0, cfg.num_codes, (1, 64))
    changed = tokens.clone()
    changed[0, 63] = (changed[0, 63] + 1) % cfg.num_codes  # the bottom-right corner
    with torch.no_grad():
        delta = (net.hidden(tokens) - net.hidden(changed)).abs().amax(-1)[0]  # (N,)
    reach = image_mask("window", 8, 8, kernel=3)[:, 63]  # the queries whose window holds token 63
    assert (delta[~reach] == 0).all() and (delta[reach] > 0).all()
