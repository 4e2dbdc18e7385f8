"""The judge's held-out prompts: a fixed split of the world's own captions that training never shows.

Drawn once from the scene sampler and the paraphrase templates with a fixed seed (per family,
the primary captions of scenes aimed at it, kept when the parser reads them back as that
family), committed as heldout_prompts.txt (the reference), read back from there.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from t2i.data.shapes.captioning import captions
from t2i.data.shapes.prompts import family_of, read_prompt_file
from t2i.data.shapes.sampling import sample_scene
from t2i.data.shapes.world import FAMILIES, Scene

HELDOUT_PATH = os.path.join(os.path.dirname(__file__), "heldout_prompts.txt")
HELDOUT_SEED = 20261122
HELDOUT_PER_FAMILY = 50


def heldout_draws(seed: int = HELDOUT_SEED, per_family: int = HELDOUT_PER_FAMILY) -> list[tuple[str, Scene, str]]:
    """(family, Scene, prompt) triples, per_family of each family, drawn from the generator's own
    scenes and paraphrase templates with a fixed seed: the held-out prompts with the scenes they
    are the primary captions of."""
    out: list[tuple[str, Scene, str]] = []
    seen: set[str] = set()
    for k, family in enumerate(FAMILIES):
        n, i = 0, 0
        while n < per_family:
            rng = np.random.default_rng([seed, k, i])
            i += 1
            scene = sample_scene(rng, family=family, background=None if family == "background" else "white")
            prompt = captions(scene, rng)[0]
            if prompt in seen or family_of(prompt) != family:
                continue
            seen.add(prompt)
            out.append((family, scene, prompt))
            n += 1
    return out


def make_heldout_prompts(seed: int = HELDOUT_SEED,
                         per_family: int = HELDOUT_PER_FAMILY) -> list[tuple[str, str]]:
    """(family, prompt) pairs, per_family of each family. Every prompt is satisfiable (it is
    the primary caption of a real scene)."""
    return [(family, prompt) for family, _scene, prompt in heldout_draws(seed, per_family)]


def write_heldout_prompts(path: str = HELDOUT_PATH) -> None:
    """Regenerates the committed held-out file (run once; the file is the reference)."""
    lines = [f"# shapes judge held-out prompts: family<TAB>prompt. Made by "
             f"t2i.data.shapes.heldout.make_heldout_prompts(seed={HELDOUT_SEED}, per_family={HELDOUT_PER_FAMILY}).",
             "# Never used for training: ShapesDataset/ShapesStream exclude these exact captions."]
    lines += [f"{f}\t{p}" for f, p in make_heldout_prompts()]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


@functools.lru_cache(maxsize=1)
def _heldout() -> tuple[tuple[str, str], ...]:
    if os.path.exists(HELDOUT_PATH):
        return tuple(read_prompt_file(HELDOUT_PATH))
    return tuple(make_heldout_prompts())  # e.g. an install that left the .txt behind


def heldout_prompts() -> list[tuple[str, str]]:
    """The judge's held-out (family, prompt) pairs (from heldout_prompts.txt)."""
    return list(_heldout())
