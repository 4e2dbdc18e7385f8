"""Seeded draws of tokens from logits: temperature, top-k, top-p (nucleus), greedy.

Every token sampler (autoregressive, masked) draws through ``sample_logits``. Randomness comes
from one ``torch.Generator`` per batch row, the diffusion samplers' convention: image i of a
request with seed s uses ``torch.Generator("cpu").manual_seed(s + i)`` (see
``t2i.seeds.seed_generators``), and row i only ever draws from
``generators[i]``, so an image's tokens never depend on the batch it is in.

A row's draw is ``torch.multinomial(probs (N, V), 1, generator=g)`` on the generator's device,
which is how diffusers' ``AmusedScheduler`` draws, so one CPU generator reproduces its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Generators = Sequence[torch.Generator | None] | None


def check_draws(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the first setting a draw cannot take (None: unset, always fine)."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: the most likely token), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be 1 or more, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale by 1/temperature, then keep the top-k, then the top-p nucleus; the rest -> -inf.

    The order is Hugging Face's ``generate`` (temperature, top-k, top-p), so top-p measures
    the nucleus of the tempered distribution restricted to the top k.

    Args:
        logits: (..., V) unnormalised log-probabilities.
        temperature: > 0 (0, greedy, is handled by ``sample_logits``).
        top_k: keep exactly the k largest logits (ties broken by ``torch.topk``); None or >= V
            keeps all.
        top_p: keep the smallest set of tokens, most probable first, whose probability
            reaches top_p (Holtzman et al. 2020, "The Curious Case of Neural Text
            Degeneration", sec. 3.1); the most probable token is always kept. None or 1 keeps all.
    Returns:
        (..., V) float32 logits with the discarded tokens at -inf.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        # scatter the kept indices instead of thresholding at the k-th value, so that tied
        # logits cannot let more than k candidates through
        kept = torch.full_like(logits, float("-inf"))
        values, indices = logits.topk(top_k, dim=-1)  # (..., k)
        logits = kept.scatter(-1, indices, values)
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        # a token joins the nucleus while the tokens before it hold less than top_p; the first
        # always joins (mass_before = 0 < top_p)
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, generators: Generators = None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Draw one token per position from softmax(filtered logits).

    Args:
        logits: (B, V) or (B, N, V).
        generators: one generator (or None for torch's global one) per batch row; row i
            draws only from generators[i]. None: the global generator for every row.
        temperature: 0 is greedy (argmax, the first of tied maxima; no random draw),
            otherwise see ``filter_logits`` with top_k and top_p.
    Returns:
        (B,) or (B, N) int64 token ids on the logits' device.
    """
    if temperature == 0:
        return logits.argmax(-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    gens = list(generators) if generators is not None else [None] * logits.shape[0]
    if len(gens) != logits.shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {logits.shape[0]}")
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)  # (B, [N,] V)
    rows = []
    for row, g in zip(probs, gens, strict=True):
        flat = row.reshape(-1, row.shape[-1])  # (N, V); N = 1 for (B, V) logits
        if g is not None:
            flat = flat.to(g.device)  # draw where the generator lives, as diffusers does
        rows.append(torch.multinomial(flat, 1, generator=g).view(row.shape[:-1]))
    return torch.stack(rows).to(logits.device)
