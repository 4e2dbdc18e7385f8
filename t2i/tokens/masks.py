"""Attention masks over a token map: DALL-E's sparse masks and a sliding (local) window.

Every mask is a boolean (N, N) matrix over the tokens of an H x W map in raster order (token i at
row i // W, column i % W): ``mask[i, j]`` is True where query i may attend to key j (the
convention of ``torch.nn.functional.scaled_dot_product_attention``). ``causal`` adds j <= i, the
autoregressive order. Each kind always lets a token see itself, so no row of a mask is empty
(an all-False row would make the softmax NaN).

- "full": every token (causal: every earlier one).
- "row", "column": the tokens of the same row / column (DALL-E, Ramesh et al. 2021, appendix
  B.1 and Figure 11 (a), (b): the axial halves of the Sparse Transformer's strided pattern).
- "conv": the k x k neighbourhood centred on the token, |dr|, |dc| <= k // 2 (DALL-E's
  convolutional mask, Figure 11 (d), 11 x 11 on its 32 x 32 map), cut at the borders.
- "window": a k x k window that contains the token and is shifted inward at the borders so that
  it always holds k x k tokens: the sliding-window attention of VQGAN-style samplers for large
  token maps (seed 000, sec. 10.1: "for the border regions the window is moved toward the image
  centre to keep its size").

DALL-E uses the three sparse kinds by layer (seed 000, sec. 10.2; DALL-E appendix B.1): layer i
(1-based) takes the column mask where (i - 2) mod 4 = 0, the row mask otherwise, and the
convolutional mask in the last layer: ``layer_kinds("dalle", layers)``. Every image token sees
every text token (``stream_mask``).
"""

from __future__ import annotations

import torch

MASK_KINDS = ("full", "row", "column", "conv", "window")
PATTERNS = (*MASK_KINDS, "dalle")  # a kind for every layer, or DALL-E's per-layer schedule


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (N,), columns (N,)) of the tokens of an H x W map in raster order."""
    index = torch.arange(height * width)
    return index // width, index % width


def _window_start(pos: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """First row (column) of the k-long window around each position, moved inward at the borders."""
    return (pos - k // 2).clamp(0, size - k)


def image_mask(kind: str, height: int, width: int, *, causal: bool = False, kernel: int = 3) -> torch.Tensor:
    """(N, N) bool mask of one kind over an H x W token map (module docstring).

    Args:
        kind: one of MASK_KINDS.
        height, width: the token map's rows and columns; N = height * width.
        causal: also require key j <= query i (raster order).
        kernel: side k of the "conv" neighbourhood and the "window" (a window larger than the map
            is the whole map along that axis).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if kernel < 1:
        raise ValueError(f"kernel must be >= 1, got {kernel}")
    r, c = _grid(height, width)
    rq, rk, cq, ck = r[:, None], r[None, :], c[:, None], c[None, :]  # query down, key across
    if kind == "full":
        mask = torch.ones(height * width, height * width, dtype=torch.bool)
    elif kind == "row":
        mask = rq == rk
    elif kind == "column":
        mask = cq == ck
    elif kind == "conv":
        mask = ((rq - rk).abs() <= kernel // 2) & ((cq - ck).abs() <= kernel // 2)
    else:  # window
        kh, kw = min(kernel, height), min(kernel, width)
        r0, c0 = _window_start(rq, height, kh), _window_start(cq, width, kw)  # (N, 1)
        mask = (rk >= r0) & (rk < r0 + kh) & (ck >= c0) & (ck < c0 + kw)
    if causal:
        mask = mask & torch.ones_like(mask).tril()
    return mask


def stream_mask(image: torch.Tensor, text_length: int, *, causal: bool = False) -> torch.Tensor:
    """(Lt + N, Lt + N) bool mask of a [text; image] stream (DALL-E's single sequence).

    Text queries see the text (causal: the earlier text) and never the image; image queries see
    every text token and the image keys that `image` (N, N) allows.
    """
    n = image.shape[0]
    total = text_length + n
    mask = torch.zeros(total, total, dtype=torch.bool)
    text = torch.ones(text_length, text_length, dtype=torch.bool)
    mask[:text_length, :text_length] = text.tril() if causal else text
    mask[text_length:, :text_length] = True
    mask[text_length:, text_length:] = image
    return mask


def layer_kinds(pattern: str, layers: int) -> list[str]:
    """The mask kind of each of `layers` layers: one kind for all, or "dalle" (column where
    (i - 2) mod 4 = 0 for the 1-based layer i, row elsewhere, conv in the last layer)."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if pattern != "dalle":
        return [pattern] * layers
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, layers + 1)]
    kinds[-1] = "conv"
    return kinds
