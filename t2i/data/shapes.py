"""The shapes world, v1 (../shared/SHAPES_WORLD.md is the contract; keep this file to it).

Scenes of 1-4 flat coloured shapes on a uniform background, rendered anti-aliased at any
size, with the full ground truth and several true captions each. Everything is a pure
function of (seed, index): scene i of seed s is drawn from
`np.random.default_rng([s, i, attempt])`, so a training stream can resume at any index.

Geometry is kept in 64x64 canvas units (integer boxes) and scaled to the output size at
render time; the caption rules (regions, relations) are read on those 64x64 units.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from t2i.data import captions as lang

# ----------------------------------------------------------------------------- the contract
CANVAS = 64  # all geometry below is in units of a 64x64 canvas
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (30, 170, 60), "blue": (35, 70, 230), "yellow": (245, 215, 20),
    "purple": (140, 45, 200), "orange": (250, 135, 0), "cyan": (0, 200, 215), "pink": (250, 120, 190),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                   "gray": (128, 128, 128)}
SHAPES = lang.SHAPES
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (10, 13), "medium": (16, 21), "large": (26, 32)}
MIN_GAP = 2  # px between bounding boxes
REGION_LO, REGION_HI = 24.0, 40.0  # left: cx < 24, right: cx > 40, center: both in [24, 40]
RELATION_MARGIN = 6.0  # A above B: cy(A) < cy(B) - 6
assert tuple(PALETTE) == lang.COLOURS and tuple(BACKGROUND_RGB) == lang.BACKGROUNDS

# Captions state a region or relation only when it holds with this much to spare (64-px
# units), so a detector that misplaces a centre by a fraction of a pixel still agrees.
# A stricter rule than the contract's is still true under the contract.
CAPTION_SAFETY = 1.0

FAMILIES = ("single", "region", "binding", "relation", "counting", "background")
# How often the scene sampler aims at each caption family (background is drawn on top:
# any scene gets a black or gray background with probability BACKGROUND_P).
FAMILY_WEIGHTS = {"single": 0.18, "region": 0.18, "binding": 0.2, "relation": 0.22, "counting": 0.22}
BACKGROUND_P = 0.25
PRIMARY_P = 0.7  # a dataset item uses the scene's primary (complete) caption this often


# ----------------------------------------------------------------------------- scenes
@dataclass
class ShapeObject:
    """One shape; x, y (top-left corner) and s (box side) in 64x64 canvas pixels."""

    shape: str
    colour: str
    size: str  # size word: small / medium / large
    x: int
    y: int
    s: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) on the 64x64 canvas, x1/y1 exclusive."""
        return (self.x, self.y, self.x + self.s, self.y + self.s)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x + self.s / 2, self.y + self.s / 2)

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    """A scene: objects, background name, and the caption family it was sampled for.

    The first `n_focus` objects are the ones the primary caption is about (the rest are
    extras a partial caption leaves out).
    """

    objects: list[ShapeObject]
    background: str = "white"
    family: str = "single"
    n_focus: int = 1

    def to_dict(self, size: int = CANVAS) -> dict:
        """Ground truth as plain JSON data; boxes and centres also given in `size` pixels."""
        k = size / CANVAS
        objs = []
        for o in self.objects:
            d = asdict(o)
            d["box"] = list(o.box)
            d["centre"] = list(o.centre)
            d["box_px"] = [v * k for v in o.box]
            objs.append(d)
        return {"background": self.background, "family": self.family, "objects": objs}


def gap(a: ShapeObject, b: ShapeObject) -> int:
    """Chebyshev distance between two boxes (negative when they overlap)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def regions_of(obj: ShapeObject, margin: float = 0.0) -> tuple[str | None, str | None]:
    """(vertical, horizontal) region words that hold for obj's centre with `margin` to spare.

    Each is 'top'/'bottom'/'center' (resp. 'left'/'right'/'center') or None when the
    centre is within `margin` of a border. 'center' only means something on both axes.
    """
    cx, cy = obj.centre

    def axis(c: float, lo_word: str, hi_word: str) -> str | None:
        if c < REGION_LO - margin:
            return lo_word
        if c > REGION_HI + margin:
            return hi_word
        if REGION_LO + margin <= c <= REGION_HI - margin:
            return "center"
        return None

    return axis(cy, "top", "bottom"), axis(cx, "left", "right")


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float = 0.0) -> bool:
    """Whether `A rel B` holds for centres a, b (64-px units) by the contract's 6 px rule."""
    m = RELATION_MARGIN + margin
    if rel == "above":
        return a[1] < b[1] - m
    if rel == "below":
        return a[1] > b[1] + m
    if rel == "left of":
        return a[0] < b[0] - m
    if rel == "right of":
        return a[0] > b[0] + m
    raise ValueError(f"unknown relation {rel!r}")


def region_holds(region: tuple[str | None, str | None], centre: tuple[float, float]) -> bool:
    """Whether a (vertical, horizontal) region claim holds for a centre (64-px units)."""
    vertical, horizontal = region
    cx, cy = centre
    if vertical == "center" or horizontal == "center":
        return REGION_LO <= cx <= REGION_HI and REGION_LO <= cy <= REGION_HI
    ok = True
    if vertical is not None:
        ok &= cy < REGION_LO if vertical == "top" else cy > REGION_HI
    if horizontal is not None:
        ok &= cx < REGION_LO if horizontal == "left" else cx > REGION_HI
    return bool(ok)


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


# ----------------------------------------------------------------------------- rendering
def shape_coverage(shape: str, box: tuple[float, float, float, float], height: int, width: int,
                   supersample: int = 4) -> tuple[slice, slice, np.ndarray]:
    """Area coverage of a shape over the pixels its box touches.

    box: (x0, y0, x1, y1) in output pixels (floats allowed; a non-square box stretches the
    shape). Returns (rows, cols, cov) with cov (h, w) float32 in [0, 1], the fraction of
    supersample x supersample points inside the shape; fully covered pixels are exactly 1.
    """
    x0, y0, x1, y1 = box
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height)
    k = supersample
    # Sample points sit a hair off the regular grid so points exactly on an edge (the
    # diamond's 45-degree sides cross grid points) fall in on one side and out on the
    # other, instead of all in: coverage then integrates to the true area.
    xs = c0 + (np.arange((c1 - c0) * k, dtype=np.float32) + 0.5) / k + 1.1e-3
    ys = r0 + (np.arange((r1 - r0) * k, dtype=np.float32) + 0.5) / k + 0.7e-3
    u = ((xs - x0) / (x1 - x0))[None, :]  # (1, w*k) in box units
    v = ((ys - y0) / (y1 - y0))[:, None]  # (h*k, 1)
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    if shape == "circle":
        inside = inside & (du * du + dv * dv <= 0.25)
    elif shape == "triangle":  # apex at top-centre, base along the bottom edge
        inside = inside & (du <= v / 2)
    elif shape == "diamond":
        inside = inside & (du + dv <= 0.5)
    elif shape == "cross":  # arms of width s/3 reaching the box edges
        inside = inside & ((du <= 1 / 6) | (dv <= 1 / 6))
    elif shape != "square":
        raise ValueError(f"unknown shape {shape!r}")
    h, w = r1 - r0, c1 - c0
    cov = inside.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)
    return slice(r0, r1), slice(c0, c1), cov


def render_array(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array; edges anti-aliased, interiors exact."""
    k = size / CANVAS
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND_RGB[scene.background]
    for obj in scene.objects:
        rows, cols, cov = shape_coverage(obj.shape, tuple(v * k for v in obj.box), size, size)
        colour = np.asarray(PALETTE[obj.colour], np.float32)
        patch = img[rows, cols]
        img[rows, cols] = patch + (colour - patch) * cov[..., None]  # cov == 1 gives colour exactly
    return np.rint(img).astype(np.uint8)


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """The scene as a size x size RGB PIL image."""
    return Image.fromarray(render_array(scene, size), "RGB")


def object_masks(scene: Scene, size: int = CANVAS) -> list[np.ndarray]:
    """Ground-truth masks, one (size, size) bool array per object: pixels at least half covered."""
    k = size / CANVAS
    masks = []
    for obj in scene.objects:
        m = np.zeros((size, size), bool)
        rows, cols, cov = shape_coverage(obj.shape, tuple(v * k for v in obj.box), size, size)
        m[rows, cols] = cov >= 0.5
        masks.append(m)
    return masks


# ----------------------------------------------------------------------------- captions
def _np(obj: ShapeObject, rng: np.random.Generator) -> str:
    # Medium is the contract's default size, so it is usually left unsaid; small and large
    # are usually named (a caption may always leave the size out).
    named = rng.random() < (0.2 if obj.size == "medium" else 0.8)
    return lang.noun_phrase(obj.colour, obj.shape, obj.size if named else None)


def _single(obj: ShapeObject, rng: np.random.Generator) -> str:
    return lang.fill(lang.SINGLE_TEMPLATES, rng, np=_np(obj, rng))


def _region(obj: ShapeObject, rng: np.random.Generator) -> str | None:
    v, h = regions_of(obj, CAPTION_SAFETY)
    options = []
    if v == "center" and h == "center":
        options.append(("center", "center"))
    if v in ("top", "bottom") and h in ("left", "right"):
        options += [(v, h), (v, h)]
    if v in ("top", "bottom"):
        options.append((v, None))
    if h in ("left", "right"):
        options.append((None, h))
    if not options:
        return None
    vv, hh = options[rng.integers(len(options))]
    return lang.fill(lang.REGION_TEMPLATES, rng, np=_np(obj, rng), region=lang.region_phrase(vv, hh, rng))


def _binding(objs: list[ShapeObject], rng: np.random.Generator) -> str | None:
    seen, distinct = set(), []
    for o in objs:
        if o.kind not in seen:
            seen.add(o.kind)
            distinct.append(o)
    if len(distinct) < 2:
        return None
    order = rng.permutation(len(distinct))
    text = lang.conjunction([_np(distinct[i], rng) for i in order], rng)
    return lang.fill(lang.BINDING_TEMPLATES, rng, list=text)


def _relation(a: ShapeObject, b: ShapeObject, rng: np.random.Generator) -> str | None:
    if a.kind == b.kind:
        return None
    if rng.random() < 0.5:
        a, b = b, a
    rels = [r for r in lang.RELATIONS if relation_holds(r, a.centre, b.centre, CAPTION_SAFETY)]
    if not rels:
        return None
    rel = rels[rng.integers(len(rels))]
    words = [w for w, r in lang.RELATION_PHRASES.items() if r == rel]
    return lang.fill(lang.RELATION_TEMPLATES, rng, a=_np(a, rng), rel=words[rng.integers(len(words))],
                     b=_np(b, rng))


def _counting(scene: Scene, kinds: list[tuple[str, str]], rng: np.random.Generator) -> str:
    """Exact counts of each kind listed (counted over the whole scene)."""
    counts = Counter(o.kind for o in scene.objects)
    phrases = []
    for i, kind in enumerate(kinds):
        # 'one' for a lone kind leading the caption, else the article ('... and a cyan square').
        phrases.append(lang.noun_phrase(kind[0], kind[1], count=counts[kind], number_word=i == 0))
    return lang.fill(lang.COUNTING_TEMPLATES, rng, list=lang.conjunction(phrases, rng))


def _primary(scene: Scene, rng: np.random.Generator) -> str | None:
    focus = scene.objects[: scene.n_focus]
    if scene.family == "single":
        return _single(focus[0], rng)
    if scene.family == "region":
        return _region(focus[0], rng)
    if scene.family == "binding":
        return _binding(focus, rng)
    if scene.family == "relation":
        return _relation(focus[0], focus[1], rng)
    kinds = list(dict.fromkeys(o.kind for o in focus))
    return _counting(scene, kinds, rng)


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Several true captions of a scene; the first is the primary one of the scene's family.

    The others cover the other families the scene supports (a single object, a region, a
    binding of two objects, a relation, exact counts), each with its own paraphrase.
    Non-white scenes name their background in every caption.
    """
    objs = scene.objects
    out = [_primary(scene, rng)]
    i = int(rng.integers(len(objs)))
    out += [_single(objs[i], rng), _region(objs[i], rng), _single(objs[i], rng)]
    if len(objs) >= 2:
        a, b = (int(v) for v in rng.choice(len(objs), 2, replace=False))
        out += [_binding([objs[a], objs[b]], rng), _relation(objs[a], objs[b], rng)]
    counts = Counter(o.kind for o in objs)
    kinds = sorted(counts, key=lambda k: -counts[k])
    if counts[kinds[0]] >= 2:
        out.append(_counting(scene, kinds[: 1 + int(len(kinds) > 1 and rng.random() < 0.5)], rng))
    elif len(kinds) == 1:
        out.append(_counting(scene, kinds, rng))  # 'one yellow cross': exact, and true
    return list(dict.fromkeys(lang.with_background(c, scene.background) for c in out if c))


# ----------------------------------------------------------------------------- datasets
@functools.lru_cache(maxsize=1)
def default_exclude() -> frozenset[str]:
    """The judge's held-out prompts, which training data never shows."""
    from t2i.eval.prompts import heldout_prompts  # eval depends on data, not the reverse

    return frozenset(p for _, p in heldout_prompts())


def shapes_example(seed: int, index: int, exclude: frozenset[str] | set[str] | None = None,
                   max_attempts: int = 100, background_p: float = BACKGROUND_P) -> tuple[Scene, str]:
    """Scene `index` of `seed` and its training caption; a pure function of (seed, index).

    The caption is the scene's primary one with probability PRIMARY_P, else another true
    caption; captions in `exclude` (default: the judge's held-out prompts) are never
    returned (the scene is redrawn if all are). background_p: share of black/gray
    backgrounds (training may weight them up; the world's own share is BACKGROUND_P).
    """
    if exclude is None:
        exclude = default_exclude()
    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, index, attempt])
        scene = sample_scene(rng, background_p=background_p)
        caps = captions(scene, rng)
        if rng.random() >= PRIMARY_P:
            caps = [caps[i] for i in rng.permutation(len(caps))]
        for c in caps:
            if c not in exclude:
                return scene, c
    raise RuntimeError(f"no caption outside the exclude set for scene {index} of seed {seed}")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(Dataset):
    """n fixed scenes of a seed; item i is (image, caption).

    image: (3, size, size) float32 in [-1, 1] when tensor=True, else (size, size, 3) uint8.
    exclude: captions never used (default: the judge's held-out prompts).
    background_p: share of black/gray backgrounds (default: the world's BACKGROUND_P).
    """

    def __init__(self, n: int, seed: int = 0, size: int = CANVAS, exclude: Iterable[str] | None = None,
                 tensor: bool = True, background_p: float = BACKGROUND_P) -> None:
        if not 0.0 <= background_p <= 1.0:
            raise ValueError(f"background_p must be in [0, 1], got {background_p}")
        self.n, self.seed, self.size, self.tensor, self.background_p = n, seed, size, tensor, background_p
        self.exclude = default_exclude() if exclude is None else frozenset(exclude)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        scene, caption = shapes_example(self.seed, i, self.exclude, background_p=self.background_p)
        image = render_array(scene, self.size)
        return (to_tensor(image) if self.tensor else image), caption


class ShapesStream(IterableDataset):
    """The endless shapes world: items seed/start, seed/start+1, ... as (image, caption).

    Resumable: the state is the next index (`state_dict()` / `load_state_dict()`, or pass
    `start`). Under DDP give rank/world_size: rank r takes indices start + r, start + r + W,
    .... With DataLoader workers set worker_chunk to the DataLoader's batch_size: workers
    then take whole batches round-robin, which the DataLoader yields back in order, so
    after k items a rank has consumed exactly its first k indices (`index_after(k)`).
    `state_dict()` tracks the position only with num_workers=0.
    """

    def __init__(self, seed: int = 0, size: int = CANVAS, start: int = 0,
                 exclude: Iterable[str] | None = None, rank: int = 0, world_size: int = 1,
                 tensor: bool = True, worker_chunk: int = 1) -> None:
        self.seed, self.size, self.tensor, self.worker_chunk = seed, size, tensor, worker_chunk
        self.index = start  # next global index this rank's sequence starts from (before rank offset)
        self.rank, self.world_size = rank, world_size
        self.exclude = default_exclude() if exclude is None else frozenset(exclude)

    def index_after(self, k: int) -> int:
        """The stream position after k items of this rank have been consumed."""
        return self.index + k * self.world_size

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.index = int(state["seed"]), int(state["index"])

    def _positions(self) -> Iterator[int]:
        """This process's positions j in the rank's sequence: all of them, or with W
        DataLoader workers, worker w's chunks [w*c, w*c + c), [(w+W)*c, ...) for c = worker_chunk."""
        info = get_worker_info()
        if info is None:
            yield from itertools.count()
            return
        c = self.worker_chunk
        for block in itertools.count(info.id, info.num_workers):
            yield from range(block * c, block * c + c)

    def __iter__(self) -> Iterator:
        start = self.index
        for j in self._positions():
            i = start + self.rank + j * self.world_size
            scene, caption = shapes_example(self.seed, i, self.exclude)
            image = render_array(scene, self.size)
            self.index = start + (j + 1) * self.world_size  # meaningful in the main process only
            yield (to_tensor(image) if self.tensor else image), caption


def write_shapes_dataset(n: int, out_dir: str, seed: int = 0, size: int = CANVAS, layout: str = "folder",
                         exclude: Iterable[str] | None = None) -> list[str]:
    """Writes n scenes as 00000.png ... with their captions; returns the image paths.

    layout 'folder': a 00000.txt caption sidecar per image (the common fine-tuning layout);
    'jsonl': manifest.jsonl lines {"image": "00000.png", "text": caption} (paths relative to
    out_dir); 'both': both. The ground truth of every scene goes to scenes.jsonl.
    """
    if layout not in ("folder", "jsonl", "both"):
        raise ValueError(f"layout must be 'folder', 'jsonl' or 'both', not {layout!r}")
    exclude = default_exclude() if exclude is None else frozenset(exclude)
    os.makedirs(out_dir, exist_ok=True)
    paths, manifest, truth = [], [], []
    for i in range(n):
        scene, caption = shapes_example(seed, i, exclude)
        name = f"{i:05d}.png"
        path = os.path.join(out_dir, name)
        render(scene, size).save(path)
        if layout in ("folder", "both"):
            with open(os.path.join(out_dir, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(caption + "\n")
        manifest.append(json.dumps({"image": name, "text": caption}))
        truth.append(json.dumps({"image": name, "text": caption, **scene.to_dict(size)}))
        paths.append(path)
    if layout in ("jsonl", "both"):
        with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(manifest) + "\n")
    with open(os.path.join(out_dir, "scenes.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(truth) + "\n")
    return paths


__all__ = [
    "BACKGROUND_RGB", "CANVAS", "FAMILIES", "PALETTE", "SHAPES", "SIZE_RANGES", "Scene", "ShapeObject",
    "ShapesDataset", "ShapesStream", "captions", "object_masks", "region_holds", "regions_of",
    "relation_holds", "render", "render_array", "sample_scene", "shape_coverage", "shapes_example",
    "write_shapes_dataset",
]
