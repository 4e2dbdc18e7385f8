"""Training pairs of the layout planner: (caption, layout) from the shapes world's scene truth.

Pair i of seed s is scene i of the world drawn from `np.random.default_rng([s, i, attempt])`, its
primary caption (`captioning.primary_with_objects`), and as target the background and the objects
the caption mentions, in the order it mentions them (a counting caption: every object of each
counted kind). A pure function of (seed, index), so a resumed run sees the same data. Captions
never shown: the judge's held-out prompts and every caption written with a held-out phrasing
(`t2i.data.shapes.phrasings`), whose scores then measure generalisation; the scene is redrawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from t2i.data.shapes.captioning import primary_with_objects
from t2i.data.shapes.datasets import default_exclude
from t2i.data.shapes.phrasings import uses_heldout_phrasing
from t2i.data.shapes.sampling import sample_scene
from t2i.data.shapes.world import ShapeObject
from t2i.layout.planner import END, encode_layout


@dataclass
class PlannerPair:
    caption: str
    background: str
    objects: list[ShapeObject]  # the ones the caption mentions, in its order


def excluded(caption: str, exclude: frozenset[str]) -> bool:
    """Whether training must never show `caption`: a judge's held-out prompt or a held-out phrasing."""
    return caption in exclude or uses_heldout_phrasing(caption)


def planner_pair(seed: int, index: int, exclude: frozenset[str] | None = None, max_attempts: int = 100) -> PlannerPair:
    """Pair `index` of `seed` (see the module docstring); exclude defaults to the judge's prompts."""
    exclude = default_exclude() if exclude is None else exclude
    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, index, attempt])
        scene = sample_scene(rng)
        primary = primary_with_objects(scene, rng)
        if primary is not None and not excluded(primary[0], exclude):
            return PlannerPair(primary[0], scene.background, primary[1])
    raise RuntimeError(f"no allowed caption for planner pair {index} of seed {seed}")


def planner_batch(seed: int, indices: list[int]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Pairs at `indices` -> (captions, tokens (B, N) END-padded to the longest, lengths (B,))."""
    pairs = [planner_pair(seed, i) for i in indices]
    seqs = [encode_layout(p.background, p.objects) for p in pairs]
    n = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [END] * (n - len(s)) for s in seqs], dtype=torch.long)
    return [p.caption for p in pairs], tokens, torch.tensor([len(s) for s in seqs])
