"""Masked generation over a codebook: MaskGIT's parallel decoding (MaskGIT, Muse).

The contract, one callable for every masked family:

    model(tokens (B, N) int64, cond) -> logits (B, N, V)

``tokens`` holds codebook ids with ``mask_id`` at the unknown positions; ``logits[:, n]`` is
the distribution of token n given all the known ones (a bidirectional transformer). The
logits cover the V codebook entries; if mask_id < V the sampler never draws it. ``cond`` is
whatever the model takes (a class, text encoder states, Muse's low-res tokens for its
super-resolution stage); wrap the model in ``t2i.tokens.CFGTokenModel`` for guidance.

Decoding follows MaskGIT (Chang et al. 2022, sec. 3.2, and ``parallel_decode.py`` of the
official code): start from all unknown; at each of ``steps`` iterations predict every
position, sample the unknown ones, and re-mask the least confident of the newly sampled
tokens so that ``floor(n0 * gamma((s + 1) / steps))`` stay unknown (n0 = the unknown count at
the start, gamma = the mask schedule); confidence is the log probability of the sampled token
plus Gumbel noise annealed to 0 over the steps. Known tokens (given, or kept by an earlier
step) are never re-masked. Inpainting and outpainting (Muse's zero-shot editing) are this
same loop started from an image's tokens with the region to redraw masked.

Random draws per step and row: a multinomial over (N, V), then N uniforms for the Gumbel noise
(none at the last step), from that row's generator. This is diffusers' ``AmusedScheduler``
order, so for one image the same CPU generator gives its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from t2i.tokens.guidance import TokenModel
from t2i.tokens.sampling import Generators, sample_logits

Callback = Callable[[dict[str, Any]], None]
Schedule = str | Callable[[torch.Tensor], torch.Tensor]

MASK_SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # MaskGIT's choice (sec. 3.3): few tokens decided early, when the model knows least
    "cosine": lambda u: torch.cos(u * math.pi / 2),
    "linear": lambda u: 1 - u,
}


def mask_ratio(u: torch.Tensor | float, schedule: Schedule = "cosine") -> torch.Tensor:
    """gamma(u): the share of tokens masked at progress u in [0, 1], gamma(0) = 1, gamma(1) = 0.

    Decoding masks ``floor(n0 * gamma((s + 1) / steps))`` tokens after step s; training masks
    ``ceil(gamma(r) * N)`` with r ~ U(0, 1) (MaskGIT sec. 3.1). Computed in float32 in
    diffusers' order of operations, so the floors match its scheduler's.

    Args:
        u: () or (B,) progress.
        schedule: "cosine" (cos(pi/2 u)), "linear" (1 - u), or a callable on a float32 tensor.
    Returns:
        float32 tensor shaped like u.
    """
    fn = MASK_SCHEDULES[schedule] if isinstance(schedule, str) else schedule
    return fn(torch.as_tensor(u, dtype=torch.float32))


def sample_training_mask(batch: int, num_tokens: int, generator: torch.Generator | None = None,
                         schedule: Schedule = "cosine", device: torch.device | str = "cpu") -> torch.Tensor:
    """MaskGIT's training mask (sec. 3.1): per row r ~ U(0, 1), then ``ceil(gamma(r) * N)``
    positions (at least 1) chosen uniformly without replacement.

    Returns:
        (B, N) bool, True where the token is replaced by mask_id (and the loss is taken).
    """
    r = torch.rand(batch, generator=generator)  # (B,)
    count = torch.ceil(mask_ratio(r, schedule) * num_tokens).clamp(1, num_tokens)  # (B,)
    scores = torch.rand(batch, num_tokens, generator=generator)  # (B, N)
    return (_ranks(scores) < count[:, None]).to(device)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) int64: each entry's position in its row sorted ascending (stable, so
    ties go to the earlier position)."""
    order = scores.argsort(dim=-1, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def gumbel_noise(shape: tuple[int, ...], generators: Generators, batch: int) -> torch.Tensor:
    """(B, *shape) float32 standard Gumbel noise ``-log(-log(u))``, row i from generators[i],
    clamped at 1e-20 as diffusers' ``gumbel_noise``."""
    gens = list(generators) if generators is not None else [None] * batch
    u = torch.stack([torch.empty(shape, device=g.device if g is not None else "cpu").uniform_(0, 1, generator=g)
                     .cpu() for g in gens])
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def choice_temperatures(choice_temperature: float | Sequence[float] | torch.Tensor, steps: int) -> torch.Tensor:
    """(steps,) float32 scale of the Gumbel noise at each step.

    A number t gives MaskGIT's annealing ``t * (1 - (s + 1) / steps)`` (0 at the last step); a
    sequence of ``steps`` values is used as given (diffusers' aMUSEd uses
    ``torch.linspace(2, 0, steps)``).
    """
    if isinstance(choice_temperature, (int, float)):
        progress = torch.arange(1, steps + 1, dtype=torch.float32) / steps
        return choice_temperature * (1 - progress)
    temps = torch.as_tensor(choice_temperature, dtype=torch.float32).flatten()
    if temps.numel() != steps:
        raise ValueError(f"{temps.numel()} choice temperatures for {steps} steps")
    return temps


@torch.no_grad()
def sample_masked(model: TokenModel, cond: Any, num_tokens: int, *, steps: int, mask_id: int,
                  generators: Generators = None, schedule: Schedule = "cosine", temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  choice_temperature: float | Sequence[float] | torch.Tensor = 4.5,
                  tokens: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
                  batch_size: int | None = None, device: torch.device | str = "cpu",
                  start_step: int = 0, count_rule: str = "unknown",
                  callback: Callback | None = None) -> torch.Tensor:
    """MaskGIT iterative decoding (Chang et al. 2022, sec. 3.2): all unknown tokens filled in
    exactly ``steps`` model calls.

    Args:
        model: ``model(tokens (B, N), cond) -> logits (B, N, V)`` (module docstring).
        cond: the model's conditioning, batched with B rows.
        num_tokens: N, e.g. 256 for a 16x16 token map (row-major, as the model reads it).
        steps: decoding iterations (model calls; diffusers' aMUSEd defaults to 12).
        mask_id: the id of the mask token.
        generators: one per row, or None for torch's global generator.
        schedule: the mask schedule gamma (``mask_ratio``).
        temperature, top_k, top_p: how each step draws the unknown tokens
            (``t2i.tokens.sampling.sample_logits``); 0 is greedy. Confidence is measured on
            the model's own distribution softmax(logits), whatever these are.
        choice_temperature: the Gumbel noise scale on the confidence (``choice_temperatures``;
            4.5 annealed, as MaskGIT's class-conditional config).
        tokens: (B, N) int64 starting tokens; positions holding mask_id are generated, the
            others are kept. None: all masked.
        fixed: (B, N) bool, optional: the positions to keep; every other position of tokens is
            masked first (Muse-style inpainting: pass the image's tokens and the region to keep).
        batch_size, device: B and the tokens' device when tokens is None and generators does
            not give B.
        start_step: the first of the `steps` to run (0: all): steps s = start_step .. steps - 1
            run with their own schedule and Gumbel scale, as diffusers' aMUSEd inpainting runs the
            last int(steps * strength) of them (fewer model calls, a shorter edit).
        count_rule: how many stay masked after step s. "unknown": floor(n0 * gamma) (MaskGIT);
            "total": floor(N * (n0 / N * gamma)) in float32, diffusers' ``AmusedScheduler`` with its
            ``starting_mask_ratio`` (what its inpainting passes). Equal for n0 = N; for n0 < N they
            can differ by one token where the float32 products round differently.
        callback: called after every step with {"i": step, "tokens": (B, N) the next step's
            input (all known after the last), "pred": (B, N) this step's full prediction}.
    Returns:
        (B, N) int64 tokens, none equal to mask_id.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
    if count_rule not in ("unknown", "total"):
        raise ValueError(f"count_rule must be 'unknown' or 'total', got {count_rule!r}")
    if tokens is None:
        batch = len(generators) if generators is not None else batch_size
        if batch is None:
            raise ValueError("give tokens, generators or batch_size to set the batch size")
        tokens = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)
    else:
        tokens = tokens.clone()
    if tokens.shape[1] != num_tokens:
        raise ValueError(f"tokens have {tokens.shape[1]} positions, expected {num_tokens}")
    if fixed is not None:
        if (tokens[fixed] == mask_id).any():
            raise ValueError("a fixed position holds mask_id")
        tokens[~fixed] = mask_id
    unknown_at_start = (tokens == mask_id).sum(-1).float()  # (B,) n0
    temps = choice_temperatures(choice_temperature, steps)

    start_ratio = unknown_at_start / num_tokens  # (B,) float32, for count_rule "total"
    for s in range(start_step, steps):
        logits = model(tokens, cond).float()  # (B, N, V)
        if mask_id < logits.shape[-1]:  # out of place: the model may hold on to its output
            logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
        unknown = tokens == mask_id  # (B, N)
        sampled = sample_logits(logits, generators, temperature, top_k, top_p)  # (B, N)
        pred = torch.where(unknown, sampled, tokens)  # known tokens stay as they are
        if s == steps - 1:
            tokens = pred  # the last step keeps every sampled token
        else:
            # how many stay masked: the schedule's count, at most one fewer than now (so every
            # step decides at least one token) and at least one (so the last step has work)
            ratio = mask_ratio(torch.tensor(s + 1, dtype=torch.float32) / steps, schedule)
            unknown_now = unknown.sum(-1)  # (B,)
            scheduled = unknown_at_start * ratio if count_rule == "unknown" else num_tokens * (start_ratio * ratio)
            count = torch.floor(scheduled).long().to(tokens.device)  # (B,)
            count = torch.minimum(count, unknown_now - 1).clamp(min=1)
            count = torch.minimum(count, unknown_now)  # nothing left to mask: mask nothing
            # confidence: log p(sampled token) + annealed Gumbel noise; known tokens are +inf,
            # so they are never among the least confident
            probs = logits.softmax(-1)  # (B, N, V)
            chosen = probs.gather(-1, pred[..., None])[..., 0]  # (B, N)
            noise = gumbel_noise((num_tokens,), generators, tokens.shape[0]).to(tokens.device)
            confidence = torch.log(chosen.clamp(1e-20)) + temps[s] * noise  # (B, N)
            confidence = confidence.masked_fill(~unknown, float("inf"))
            remask = _ranks(confidence) < count[:, None]  # (B, N) the `count` least confident
            tokens = pred.masked_fill(remask, mask_id)
        if callback is not None:
            callback({"i": s, "tokens": tokens, "pred": pred})
    return tokens
