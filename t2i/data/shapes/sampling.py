"""Drawing scenes: a scene aimed at one caption family, objects placed at random without overlap.

Everything is a pure function of the generator passed in, so a caller that seeds it from
(seed, index) can redraw any scene.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from t2i.data import captions as lang
from t2i.data.shapes.world import (
    CANVAS,
    CAPTION_SAFETY,
    MIN_GAP,
    SHAPES,
    SIZE_RANGES,
    Scene,
    ShapeObject,
    gap,
    regions_of,
    relation_holds,
)

# How often the scene sampler aims at each caption family (background is drawn on top:
# any scene gets a black or gray background with probability BACKGROUND_P).
FAMILY_WEIGHTS = {"single": 0.18, "region": 0.18, "binding": 0.2, "relation": 0.22, "counting": 0.22}
BACKGROUND_P = 0.25


def _random_kind(rng: np.random.Generator, avoid: Iterable[tuple[str, str]] = ()) -> tuple[str, str]:
    avoid = set(avoid)
    while True:
        kind = (lang.COLOURS[rng.integers(8)], SHAPES[rng.integers(5)])
        if kind not in avoid:
            return kind


def _random_size(rng: np.random.Generator, n_objects: int) -> str:
    # Four large shapes rarely fit; crowded scenes lean to smaller sizes.
    cumulative = {1: (1, 2, 3), 2: (1, 2, 3), 3: (2, 4, 5), 4: (3, 6, 7)}[min(n_objects, 4)]
    u = rng.random() * cumulative[-1]
    return lang.SIZE_WORDS[next(i for i, c in enumerate(cumulative) if u < c)]


def _place(specs: list[tuple[str, str, str]], rng: np.random.Generator, accept=None,
           tries: int = 60) -> list[ShapeObject] | None:
    """Places (colour, shape, size word) specs at random, no overlap, MIN_GAP apart.

    accept(obj, placed) -> bool adds a constraint for each new object. None on failure.
    """
    placed: list[ShapeObject] = []
    for colour, shape, size in specs:
        lo, hi = SIZE_RANGES[size]
        if shape == "cross":
            # Arms of width s/3 with s a multiple of 3 fall on pixel boundaries at 64x64:
            # a cut arm edge blends red and white into a 1 px pink line long enough to pass
            # for an object under the contract's nearest-colour reading.
            s = 3 * int(rng.integers(-(-lo // 3), hi // 3 + 1))
        else:
            s = int(rng.integers(lo, hi + 1))
        for x, y in rng.integers(0, CANVAS - s + 1, size=(tries, 2)).tolist():  # one draw per object
            obj = ShapeObject(shape, colour, size, x, y, s)
            if all(gap(obj, p) >= MIN_GAP for p in placed) and (accept is None or accept(obj, placed)):
                placed.append(obj)
                break
        else:
            return None
    return placed


def _extras(rng: np.random.Generator, p: float, room: int, avoid: set) -> list[tuple[str, str]]:
    """With probability p, 1 to `room` objects of kinds other than `avoid` (a partial caption
    leaves them out)."""
    n = int(rng.integers(1, room + 1)) if room > 0 and rng.random() < p else 0
    return [_random_kind(rng, avoid) for _ in range(n)]


def _scene_specs(family: str, rng: np.random.Generator):
    """Object kinds (colour, shape) for a family, how many lead in focus, and a placement constraint."""
    if family in ("single", "region"):
        kind = _random_kind(rng)
        specs = [kind] + _extras(rng, 0.2, 2, {kind})
        accept = None
        if family == "region":
            target = list(lang.REGION_PHRASES)[rng.integers(len(lang.REGION_PHRASES))]

            def accept(obj, placed, target=target):
                if placed:
                    return True
                v, h = regions_of(obj, CAPTION_SAFETY)
                return all(t is None or t == w for t, w in zip(target, (v, h), strict=True))
        return specs, 1, accept
    if family == "binding":
        n = 2 if rng.random() < 0.6 else 3
        kinds: list[tuple[str, str]] = []
        for _ in range(n):
            kinds.append(_random_kind(rng, kinds))
        return kinds, n, None
    if family == "relation":
        a = _random_kind(rng)
        b = _random_kind(rng, [a])
        rel = lang.RELATIONS[rng.integers(4)]

        def accept(obj, placed, rel=rel):
            return len(placed) != 1 or relation_holds(rel, placed[0].centre, obj.centre, CAPTION_SAFETY)
        return [a, b] + _extras(rng, 0.15, 1, {a, b}), 2, accept
    if family == "counting":
        n_a = int(rng.choice([2, 3, 4], p=[0.45, 0.35, 0.2]))
        a = _random_kind(rng)
        specs = [a] * n_a
        if n_a < 4 and rng.random() < 0.5:
            b = _random_kind(rng, [a])
            n_b = int(rng.integers(1, 4 - n_a + 1))
            specs += [b] * n_b
        n_focus = len(specs)
        specs += _extras(rng, 0.1, 4 - n_focus, set(specs))
        return specs, n_focus, None
    raise ValueError(f"unknown family {family!r}")


def sample_scene(rng: np.random.Generator, family: str | None = None, background: str | None = None,
                 background_p: float = BACKGROUND_P) -> Scene:
    """Draws a scene aimed at a caption family (chosen by FAMILY_WEIGHTS when None).

    family 'background' means a non-white background with any of the other families;
    otherwise the background is black or gray with probability background_p.
    """
    if family == "background":
        family, background = None, background or ("black" if rng.random() < 0.5 else "gray")
    if family is None:
        names = list(FAMILY_WEIGHTS)
        p = np.asarray([FAMILY_WEIGHTS[k] for k in names])
        family = names[rng.choice(len(names), p=p / p.sum())]
    if background is None:
        background = ("black" if rng.random() < 0.5 else "gray") if rng.random() < background_p else "white"
    while True:
        specs, n_focus, accept = _scene_specs(family, rng)
        # Objects of one kind in a counting group share a size word (the caption names none).
        sizes: dict[tuple[str, str], str] = {}
        full = []
        for i, (colour, shape) in enumerate(specs):
            key = (colour, shape) if family == "counting" and i < n_focus else (colour, shape, i)
            size = sizes.setdefault(key, _random_size(rng, len(specs)))
            full.append((colour, shape, size))
        objects = _place(full, rng, accept)
        if objects is not None:
            return Scene(objects, background, family, n_focus)


def place_on_canvas(scene: Scene, width: int, height: int) -> Scene | None:
    """The square-world scene moved onto a width x height canvas (world units, 64 per side of
    the square world), or None when it does not fit there.

    Object sides stay as drawn; each centre keeps its place as a fraction of the canvas
    (cx' = cx * width / 64), so the caption's regions still hold, read as fractions of the
    canvas (`left`: cx' < 24/64 of the width), as do its relations, whose 6-unit margin then
    scales with the side it is measured along. None when an object leaves the canvas or two
    come closer than MIN_GAP (the caller draws another scene).
    """
    moved = []
    for o in scene.objects:
        x = round(o.centre[0] * width / CANVAS - o.s / 2)
        y = round(o.centre[1] * height / CANVAS - o.s / 2)
        if not (0 <= x <= width - o.s and 0 <= y <= height - o.s):
            return None
        moved.append(ShapeObject(o.shape, o.colour, o.size, x, y, o.s))
    if any(gap(a, b) < MIN_GAP for i, a in enumerate(moved) for b in moved[:i]):
        return None
    return Scene(moved, scene.background, scene.family, scene.n_focus)
