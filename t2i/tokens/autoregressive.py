"""Autoregressive generation over a codebook (DALL-E, Parti, DALL-E mini).

The contract, one callable for every autoregressive family:

    model(tokens (B, T) int64, cond) -> logits (B, T + 1, V)

``logits[:, t]`` is the distribution of token t given ``tokens[:, :t]`` and cond, for
t = 0..T: the model owns whatever comes before the first image token (DALL-E's text tokens in
the same stream, Parti's BOS after a text encoder read by cross-attention), so T may be 0 and
the samplers never handle start tokens. Training is teacher forcing on the same call:
``cross_entropy(model(tokens[:, :-1], cond), tokens)`` scores every position of a (B, L)
sequence. ``cond`` is whatever the model takes (text ids, encoder states, a mapping); wrap
the model in ``t2i.tokens.CFGTokenModel`` for classifier-free guidance.

The sampler calls the model on growing prefixes of one sequence (T = P, P + 1, ...), so a
model may keep a KV cache between calls and feed only the new token; none does yet, and the
sampler does not need to know.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from t2i.tokens.guidance import TokenModel
from t2i.tokens.sampling import Generators, sample_logits

Callback = Callable[[dict[str, Any]], None]


@torch.no_grad()
def sample_autoregressive(model: TokenModel, cond: Any, length: int, *, generators: Generators = None,
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          prefix: torch.Tensor | None = None, batch_size: int | None = None,
                          device: torch.device | str = "cpu", callback: Callback | None = None) -> torch.Tensor:
    """Draw ``length`` tokens one at a time, each from the model given all before it.

    Args:
        model: ``model(tokens (B, T), cond) -> logits (B, T + 1, V)`` (module docstring).
        cond: the model's conditioning, batched with B rows.
        length: tokens in the output, prefix included (e.g. 256 for a 16x16 token map).
        generators: one per row (row i draws only from generators[i]; see
            ``t2i.tokens.sampling``), or None for torch's global generator.
        temperature, top_k, top_p: as ``t2i.tokens.sampling.sample_logits``; 0 is greedy.
        prefix: (B, P) int64 given first tokens, kept as they are (image completion from the
            top rows, as DALL-E's image prompts); P <= length.
        batch_size: B when neither prefix nor generators says it.
        device: where the tokens live when there is no prefix (the model's device).
        callback: called after every drawn token with {"i": position, "tokens": (B, i + 1)
            the tokens so far, "logits": (B, V) the logits token i was drawn from}.
    Returns:
        (B, length) int64 tokens.
    """
    if prefix is not None:
        batch, device = prefix.shape[0], prefix.device
    elif generators is not None:
        batch = len(generators)
    elif batch_size is not None:
        batch = batch_size
    else:
        raise ValueError("give prefix, generators or batch_size to set the batch size")
    start = 0 if prefix is None else prefix.shape[1]
    if start > length:
        raise ValueError(f"prefix of {start} tokens is longer than length {length}")
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)  # (B, L)
    if prefix is not None:
        tokens[:, :start] = prefix
    for i in range(start, length):
        logits = model(tokens[:, :i], cond)  # (B, i + 1, V)
        if logits.shape[:2] != (batch, i + 1):
            raise ValueError(f"model returned logits {tuple(logits.shape)} for tokens ({batch}, {i}); "
                             f"the contract is (B, T + 1, V)")
        last = logits[:, -1]  # (B, V): the distribution of token i
        tokens[:, i] = sample_logits(last, generators, temperature, top_k, top_p)
        if callback is not None:
            callback({"i": i, "tokens": tokens[:, : i + 1], "logits": last})
    return tokens
