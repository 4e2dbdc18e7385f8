"""Seeds -> random draws, one convention for every family (DESIGN.md "Conventions users expect"):
image i of a request with seed s draws from its own CPU generator seeded s + i, so an image never
depends on the batch it is in, and for batch 1 the draws are diffusers' (one CPU generator through
prepare_latents and every later step)."""

from __future__ import annotations

import secrets

import torch


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image. Each draws its image's starting noise and then any noise the
    sampler needs (ancestral steps, token draws)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def seed_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(n, *shape) starting noise, image i = torch.randn((1, *shape), generator=generators[i])."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


RANDOM = -1  # A1111's "random seed"


def random_seed() -> int:
    """A fresh seed in A1111's range [0, 2**32), from the OS's randomness (not torch's global RNG,
    which a seeded run may have fixed)."""
    return secrets.randbelow(2**32)


def resolve_seed(seed: int | None) -> int:
    """None or -1 -> a random seed; any other seed must be in [0, 2**32)."""
    if seed is None or seed == RANDOM:
        return random_seed()
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be -1 (random) or in [0, 2**32), got {seed}")
    return seed
