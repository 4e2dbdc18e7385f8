"""A word the built-in model never saw: shapes-world scenes with a shape outside the v1 contract
(`world.NEW_SHAPES`, e.g. 'ring'), for issue 21's LoRA / textual-inversion demonstration. Opt-in only:
nothing else in the world samples, captions or judges these shapes.

A new-word scene is an ordinary scene (`shapes_example`, same families, placements and captions) in which
every object of one kind (colour, shape), the first object's, is drawn as the new shape instead, and
its caption says so: the noun phrases of that kind ('a small red circle', 'three red circles') become
'a small red ring', 'three red rings'. Captions always name an object's colour before its noun, so the
swap touches that kind only. Everything is a pure function of (seed, index), as in `shapes_example`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from t2i.data import captions as lang
from t2i.data.shapes.datasets import shapes_example
from t2i.data.shapes.rendering import render
from t2i.data.shapes.world import NEW_SHAPES, Scene

NEW_WORD_SEED = 21  # the scenes' default seed: not the built-in model's training seed (0)


def with_new_shape(scene: Scene, caption: str, shape: str) -> tuple[Scene, str]:
    """The scene with every object of its first object's kind drawn as `shape`, and the caption with
    that kind's noun phrases renamed (singular and plural)."""
    if shape not in NEW_SHAPES:
        raise ValueError(f"{shape!r} is not one of the new shapes {sorted(NEW_SHAPES)}")
    colour, old = scene.objects[0].kind
    objects = [dataclasses.replace(o, shape=shape) if o.kind == (colour, old) else o for o in scene.objects]
    caption = re.sub(rf"\b{colour} {lang.PLURALS[old]}\b", f"{colour} {NEW_SHAPES[shape]}", caption)
    caption = re.sub(rf"\b{colour} {old}\b", f"{colour} {shape}", caption)
    return dataclasses.replace(scene, objects=objects), caption


def new_word_example(seed: int, index: int, shape: str = "ring") -> tuple[Scene, str]:
    """Scene `index` of `seed` with the new shape (see the module docstring) and its caption."""
    return with_new_shape(*shapes_example(seed, index), shape)


def new_word_prompts(n: int, shape: str = "ring", seed: int = NEW_WORD_SEED + 1) -> list[tuple[str, str]]:
    """n (family, prompt) pairs that use the new word: the primary captions of new-word scenes of `seed`
    (a seed the training folder does not use), those naming the shape, without repeats."""
    out: dict[str, str] = {}
    index = 0
    while len(out) < n:
        scene, caption = new_word_example(seed, index, shape)
        index += 1
        if names_shape(caption, shape) and caption not in out:
            out[caption] = "background" if scene.background != "white" else scene.family
    return [(family, prompt) for prompt, family in out.items()]


def names_shape(caption: str, shape: str) -> bool:
    return re.search(rf"\b({shape}|{NEW_SHAPES[shape]})\b", caption) is not None


def placeholder_caption(caption: str, shape: str, word: str) -> str:
    """The caption with the shape's noun written `word` (plural `word` + 's'): textual inversion's
    placeholder, e.g. '[name]' (A1111's template word, which `t2i train textual-inversion` replaces)."""
    return re.sub(rf"\b{shape}\b", word, re.sub(rf"\b{NEW_SHAPES[shape]}\b", word + "s", caption))


def write_new_word_folder(folder: str | Path, n: int, shape: str = "ring", share: float = 0.75,
                          seed: int = NEW_WORD_SEED, size: int = 64, word: str | None = None) -> Path:
    """n images with .txt caption sidecars (`t2i train lora --data folder`): a `share` of them new-word
    scenes, the rest ordinary scenes of the same seed (so the old words keep being seen).

    word (textual inversion): every image a new-word scene whose caption names the shape, written `word`
    (`placeholder_caption`): a caption without the word would train nothing."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    picks = np.random.default_rng([seed, n]).random(n) < share
    written, index = 0, 0
    while written < n:
        new = word is not None or bool(picks[index])
        scene, caption = new_word_example(seed, index, shape) if new else shapes_example(seed, index)
        index += 1
        if word is not None:
            if not names_shape(caption, shape):
                continue
            caption = placeholder_caption(caption, shape, word)
        render(scene, size).save(folder / f"{written:05d}.png")
        (folder / f"{written:05d}.txt").write_text(caption + "\n", encoding="utf-8")
        written += 1
    return folder
