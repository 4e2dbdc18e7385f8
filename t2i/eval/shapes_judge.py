"""The shapes judge: does an image show what a shapes-world prompt says? (SHAPES_WORLD.md v1)

detect: every pixel takes the nearest of the 8 palette colours and the 3 background
colours; the most common background colour is the image's background; connected
components (4-neighbour) of one palette colour with at least 12 pixels on 64x64 (scaled
by area) are the objects. Each is classified by template IoU: the five shape templates
are drawn in a square box and compared with the component. The box is fitted rather than
read off the hard mask: the component's pixels (and the 1 px anti-aliased rim around
them) are turned into coverage by projecting each pixel onto the background -> colour
line, and the box side and centre come from that coverage's area and centroid. This reads
sizes and centres to a fraction of a pixel, where the hard mask's bounding box loses a
pixel at a diamond's tips or a triangle's apex (enough to call a 16 px diamond small).
judge: checks a prompt's claims (background, presence, colour-shape binding, exact
counts, regions, relations) against the detections. Positions and sizes are read in
64x64 canvas units whatever the (square) image size.
new_shapes (opt-in, default none): shapes outside the v1 contract (`world.NEW_SHAPES`, e.g. 'ring') join
the templates and the prompt language, for a model taught a new word; without it nothing changes.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2i.data import shapes as world
from t2i.data.shapes.heldout import heldout_prompts
from t2i.data.shapes.phrasings import uses_heldout_phrasing
from t2i.data.shapes.prompts import Claims, ObjectClaim, PromptError, check_new_shapes, family_of, parse_prompt
from t2i.data.shapes.world import FAMILIES
from t2i.layout.spec import Layout

MIN_AREA_64 = 12  # px on a 64x64 canvas
# A component whose best template IoU is below this is not a shape (a smear, an
# anti-aliasing fringe); it is reported as shape None and matches no claim.
MIN_SHAPE_IOU = 0.5
_REFS = np.asarray(list(world.PALETTE.values()) + list(world.BACKGROUND_RGB.values()), np.float32)  # (11, 3)
_NAMES = list(world.PALETTE) + list(world.BACKGROUND_RGB)
_N_COLOURS = len(world.PALETTE)


@dataclass
class Detection:
    """One detected object. box (x0, y0, x1, y1) and centre in 64x64 canvas units."""

    colour: str
    shape: str | None
    size: str
    box: tuple[float, float, float, float]
    centre: tuple[float, float]
    area: int  # pixels in the image as given
    iou: float  # best template IoU


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]


@dataclass(frozen=True)
class Refused:
    """In place of an image: the model refused the prompt (a class-conditional model given a caption
    naming several classes). Judged a miss, counted apart, so that every family is scored on the same
    prompts."""

    message: str


def _as_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        arr = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte().numpy()
        return arr.transpose(1, 2, 0)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.dtype} {arr.shape}")
    return arr


def segment(image) -> tuple[np.ndarray, str]:
    """Nearest-colour labels (H, W) int (0-7 palette in PALETTE order, 8+ backgrounds) and
    the background name (the most common background label)."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    # squared distance to each reference colour, minus the |pixel|^2 all of them share
    d = (_REFS**2).sum(-1) - 2.0 * arr.reshape(-1, 3).astype(np.float32) @ _REFS.T  # (H*W, 11)
    labels = d.argmin(-1).reshape(h, w)
    bg_counts = np.bincount(labels.ravel(), minlength=len(_NAMES))[_N_COLOURS:]
    return labels, _NAMES[_N_COLOURS + int(bg_counts.argmax())]


def connected_components(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """4-neighbour components of equal labels among valid pixels.

    Returns (H, W) int64: for valid pixels the smallest flat index in their component, -1
    elsewhere. Min-label propagation with pointer jumping, vectorised.
    """
    h, w = labels.shape
    big = h * w
    comp = np.where(valid, np.arange(big).reshape(h, w), big)
    same_h = valid[:, 1:] & valid[:, :-1] & (labels[:, 1:] == labels[:, :-1])  # (H, W-1)
    same_v = valid[1:, :] & valid[:-1, :] & (labels[1:, :] == labels[:-1, :])  # (H-1, W)
    while True:
        new = comp.copy()
        np.minimum(new[:, 1:], np.where(same_h, comp[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_h, comp[:, 1:], big), out=new[:, :-1])
        np.minimum(new[1:, :], np.where(same_v, comp[:-1, :], big), out=new[1:, :])
        np.minimum(new[:-1, :], np.where(same_v, comp[1:, :], big), out=new[:-1, :])
        flat = new.ravel()
        ok = flat < big
        for _ in range(4):  # pointer jumping: follow each pixel's label to that pixel's label
            flat[ok] = flat[flat[ok]]
        if np.array_equal(new, comp):
            return np.where(valid, comp, -1)
        comp = new


# Area of each shape as a fraction of its box (circle pi/4, cross 5/9, ...).
AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9,
                 "ring": np.pi / 4 * (1 - world.RING_HOLE**2)}


def size_word(side: float) -> str:
    """Size word for a box side in 64-px units: nearest range, split half-way between ranges."""
    small_hi, medium_lo = world.SIZE_RANGES["small"][1], world.SIZE_RANGES["medium"][0]
    medium_hi, large_lo = world.SIZE_RANGES["medium"][1], world.SIZE_RANGES["large"][0]
    if side < (small_hi + medium_lo) / 2:
        return "small"
    return "medium" if side < (medium_hi + large_lo) / 2 else "large"


def _fit(alpha: np.ndarray, shapes: Sequence[str] = world.SHAPES
         ) -> tuple[str | None, float, tuple[float, float, float, float]]:
    """Best shape for a coverage map: (shape or None, IoU, box (x0, y0, x1, y1) in window px).

    For each shape the box is the square whose side gives the measured area and whose
    centre gives the measured centroid (a triangle's centroid sits s/6 below its box
    centre); the shape drawn in that box is compared with alpha by soft IoU
    (sum of minima over sum of maxima). Anti-aliased edges count by their coverage, so a
    rendered shape fits its own template almost exactly at any size.
    """
    h, w = alpha.shape
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = float((alpha * (xs + 0.5)).sum() / area), float((alpha * (ys + 0.5)).sum() / area)
    best: tuple[str | None, float, tuple[float, float, float, float]] = (None, 0.0, (0.0, 0.0, 0.0, 0.0))
    for shape in shapes:
        s = float(np.sqrt(area / AREA_FRACTION[shape]))
        by = cy - s / 6 if shape == "triangle" else cy
        box = (cx - s / 2, by - s / 2, cx + s / 2, by + s / 2)
        t = np.zeros_like(alpha)
        rows, cols, cov = world.shape_coverage(shape, box, h, w)
        t[rows, cols] = cov
        iou = float(np.minimum(alpha, t).sum() / np.maximum(alpha, t).sum())
        if iou > best[1]:
            best = (shape, iou, box)
    return (best[0] if best[1] >= MIN_SHAPE_IOU else None), best[1], best[2]


def analyse(image, new_shapes: Sequence[str] = ()) -> tuple[str, list[Detection]]:
    """(background name, detections) of an image; see the module docstring. new_shapes: templates
    of world.NEW_SHAPES tried too."""
    check_new_shapes(new_shapes)
    shapes = tuple(world.SHAPES) + tuple(new_shapes)
    arr = _as_array(image)
    labels, background = segment(arr)
    h, w = labels.shape
    sx, sy = world.CANVAS / w, world.CANVAS / h
    valid = labels < _N_COLOURS
    comp = connected_components(labels, valid)
    ids, counts = np.unique(comp[valid], return_counts=True)
    min_area = MIN_AREA_64 * (h * w) / world.CANVAS**2
    big = ids[counts >= min_area]
    owner = np.where(np.isin(comp, big), comp, -1)  # pixels of kept components, else -1
    bg = np.asarray(world.BACKGROUND_RGB[background], np.float32)
    pad = int(np.ceil(max(h, w) / world.CANVAS))  # anti-aliased edges reach ~1 px (64x64) outside
    detections = []
    for cid, area in zip(ids.tolist(), counts.tolist(), strict=True):
        if area < min_area:
            continue
        colour = _NAMES[int(labels.flat[cid])]
        ys, xs = np.nonzero(comp == cid)
        r0, r1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, h)
        c0, c1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, w)
        # Coverage of this colour over the background, pixel by pixel: the projection of
        # the pixel onto the background -> colour segment, over pixels no other object owns.
        target = np.asarray(world.PALETTE[colour], np.float32) - bg
        win = arr[r0:r1, c0:c1].astype(np.float32) - bg  # (h', w', 3)
        alpha = np.clip(win @ target / float(target @ target), 0.0, 1.0)
        own = owner[r0:r1, c0:c1]
        alpha[(own != cid) & (own != -1)] = 0.0
        shape, iou, (bx0, by0, bx1, by1) = _fit(alpha, shapes)
        box = ((c0 + bx0) * sx, (r0 + by0) * sy, (c0 + bx1) * sx, (r0 + by1) * sy)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        detections.append(Detection(colour, shape, size_word(box[2] - box[0]), box, centre, area, iou))
    return background, detections


def detect(image, new_shapes: Sequence[str] = ()) -> list[Detection]:
    """The objects in an image (PIL, (H, W, 3) uint8 array, or (3, H, W) tensor in [-1, 1])."""
    return analyse(image, new_shapes)[1]


def _matches(d: Detection, c: ObjectClaim) -> bool:
    return (d.shape == c.shape and (c.colour is None or d.colour == c.colour)
            and (c.size is None or d.size == c.size)
            and (c.region is None or world.region_holds(c.region, d.centre)))


def _assignable(candidates: list[list[int]], counts: list[int]) -> bool:
    """Whether each claim k can get counts[k] detections from candidates[k], all distinct."""
    if all(len(c) >= sum(counts) for c in candidates):
        return True  # Hall's condition holds trivially; skip the search

    def go(k: int, used: frozenset[int]) -> bool:
        if k == len(candidates):
            return True
        free = [i for i in candidates[k] if i not in used]
        return any(go(k + 1, used | set(pick)) for pick in itertools.combinations(free, counts[k]))
    return go(0, frozenset())


def check(claims: Claims, background: str, detections: list[Detection]) -> Verdict:
    """Checks parsed claims against a detection result."""
    reasons = []
    expected = claims.background or "white"
    if background != expected:
        reasons.append(f"background is {background}, expected {expected}")
    candidates = [[i for i, d in enumerate(detections) if _matches(d, c)] for c in claims.objects]
    for c, cand in zip(claims.objects, candidates, strict=True):
        if c.exact and len(cand) != c.count:
            reasons.append(f"found {len(cand)} of '{c.describe()}', expected exactly {c.count}")
        elif not c.exact and len(cand) < c.count:
            reasons.append(f"found {len(cand)} of '{c.describe()}', expected at least {c.count}")
    if not reasons and not _assignable(candidates, [c.count for c in claims.objects]):
        reasons.append("the objects named cannot all be told apart (one object counted twice)")
    if claims.relation is not None and not reasons:
        a, b = candidates
        rel, det = claims.relation, detections
        if not any(i != j and world.relation_holds(rel, det[i].centre, det[j].centre) for i in a for j in b):
            reasons.append(f"no '{claims.objects[0].describe()}' {claims.relation} "
                           f"'{claims.objects[1].describe()}'")
    return Verdict(ok=not reasons, reasons=reasons)


def judge(image, prompt: str | Claims, new_shapes: Sequence[str] = ()) -> Verdict:
    """Whether `image` shows what `prompt` says; reasons name each failed claim. new_shapes: words of
    world.NEW_SHAPES the prompt may use and the detector may find."""
    claims = parse_prompt(prompt, new_shapes) if isinstance(prompt, str) else prompt
    background, detections = analyse(image, new_shapes)
    return check(claims, background, detections)


def evaluate(images: Sequence, prompts: Sequence[str], families: Sequence[str] | None = None,
             new_shapes: Sequence[str] = ()) -> dict:
    """Judges images[i] against prompts[i]. Returns JSON-ready results:

    {"overall": accuracy, "n": count, "accuracy": {family: accuracy}, "count": {family: n},
     "refused": {family: prompts the model refused} (only where any was),
     "unseen_phrasing": unseen_phrasing(results), "results": [{"prompt", "family", "ok", "reasons"}, ...]};
    families default to family_of. new_shapes: as in `judge`. An image may be a `Refused`: a miss.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    results = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        claims = parse_prompt(prompt, new_shapes)
        family = families[i] if families is not None else family_of(claims)
        if isinstance(image, Refused):
            results.append({"prompt": prompt, "family": family, "ok": False, "refused": True,
                            "reasons": [f"refused by the model: {image.message}"]})
            continue
        v = judge(image, claims, new_shapes)
        results.append({"prompt": prompt, "family": family, "ok": v.ok, "reasons": v.reasons})
    overall, acc, cnt = accuracy_by_family([r["family"] for r in results], [r["ok"] for r in results])
    report = {"overall": overall, "n": len(results), "accuracy": acc, "count": cnt}
    refused = [r["family"] for r in results if r.get("refused")]
    if refused:
        report["refused"] = {f: refused.count(f) for f in cnt if f in refused}
    return {**report, "unseen_phrasing": unseen_phrasing(results), "results": results}


def unseen_phrasing(results: Sequence[dict]) -> dict:
    """The judge's accuracy on the prompts written with a phrasing held out of the layout model's
    training (`t2i.data.shapes.phrasings`): {"n", "accuracy" (None when n is 0), "by_family",
    "count"}. Reported for every model, so a model trained on them is read on the same subset."""
    subset = [r for r in results if uses_heldout_phrasing(r["prompt"])]
    overall, acc, cnt = accuracy_by_family([r["family"] for r in subset], [r["ok"] for r in subset])
    return {"n": len(subset), "accuracy": overall if subset else None, "by_family": acc, "count": cnt}


def truth_layouts(prompts: Sequence[str]) -> dict[str, Layout]:
    """prompt -> the layout of the held-out scene it is the caption of (`t2i eval shapes --layouts
    truth`: the judge's check of a layout-conditioned model given the true boxes). Raises ValueError
    naming the prompts that are not held-out ones (no scene, so no truth)."""
    from t2i.data.shapes.heldout import heldout_draws
    from t2i.data.shapes.layouts import scene_layout

    scenes = {prompt: scene for _family, scene, prompt in heldout_draws()}
    missing = [p for p in prompts if p not in scenes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"--layouts truth needs the judge's held-out prompts (their scenes give the layouts); "
                         f"not one of them: {missing[0]!r}{more}")
    return {p: scene_layout(scenes[p]) for p in prompts}


def accuracy_by_family(families: Sequence[str], oks: Sequence[bool]) -> tuple[float, dict[str, float], dict[str, int]]:
    """(overall share of oks, share per family, count per family); the judge's families first, in
    their order, then any others sorted."""
    acc, cnt = {}, {}
    for f in FAMILIES + tuple(sorted(set(families) - set(FAMILIES))):
        rs = [ok for fam, ok in zip(families, oks, strict=True) if fam == f]
        if rs:
            acc[f], cnt[f] = sum(rs) / len(rs), len(rs)
    return (sum(oks) / len(oks) if oks else 0.0), acc, cnt


def save_grid(images: Sequence, prompts: Sequence[str], verdicts: Sequence[Verdict | bool | dict], path: str,
              cols: int = 8, cell: int = 128) -> None:
    """A PNG grid: each image scaled to cell px, framed green (ok) or red (not), prompt below; a refused
    prompt (`Refused`) shows a gray tile saying so."""
    font = ImageFont.load_default()
    border, text_h, wrap = 4, 48, max(10, cell // 6)
    cw, ch = cell + 2 * border, cell + 2 * border + text_h
    rows = max(1, -(-len(images) // cols))
    grid = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (image, prompt, v) in enumerate(zip(images, prompts, verdicts, strict=True)):
        ok = v.ok if isinstance(v, Verdict) else v["ok"] if isinstance(v, dict) else bool(v)
        x, y = (k % cols) * cw, (k // cols) * ch
        frame = (30, 170, 60) if ok else (220, 20, 20)
        draw.rectangle([x, y, x + cw - 1, y + cell + 2 * border - 1], fill=frame)
        if isinstance(image, Refused):
            grid.paste(Image.new("RGB", (cell, cell), (200, 200, 200)), (x + border, y + border))
            draw.text((x + border + 4, y + border + cell // 2 - 6), "refused", fill=(0, 0, 0), font=font)
        else:
            grid.paste(Image.fromarray(_as_array(image)).resize((cell, cell), Image.NEAREST), (x + border, y + border))
        lines = textwrap.wrap(prompt, wrap)[:4]
        draw.multiline_text((x + 2, y + cell + 2 * border + 1), "\n".join(lines), fill=(0, 0, 0), font=font,
                            spacing=1)
    grid.save(path)


def run_shapes_eval(generate: Callable[[list[str]], Sequence],
                    prompts: Sequence[tuple[str, str]] | None = None, out_dir: str | None = None,
                    batch_size: int = 16, grid_size: int = 64, new_shapes: Sequence[str] = ()) -> dict:
    """Generates an image per prompt and judges it: the body of `t2i eval shapes`.

    generate(list of prompts) -> list of images (PIL, (H, W, 3) uint8, or (3, H, W) in
    [-1, 1]) or `Refused` for a prompt the model cannot draw. prompts: (family, prompt) pairs, default the
    held-out set. new_shapes: as in `judge`. With out_dir, writes results.json (the evaluate() dict) and
    grid.png (the first grid_size images).
    """
    import json
    import os

    pairs = list(prompts) if prompts is not None else heldout_prompts()
    texts = [p for _, p in pairs]
    images: list = []
    for i in range(0, len(texts), batch_size):
        images.extend(generate(texts[i:i + batch_size]))
    result = evaluate(images, texts, [f for f, _ in pairs], new_shapes)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        k = min(grid_size, len(images))
        save_grid(images[:k], texts[:k], result["results"][:k], os.path.join(out_dir, "grid.png"))
    return result


__all__ = ["Detection", "PromptError", "Refused", "Verdict", "accuracy_by_family", "analyse", "check", "detect",
           "evaluate", "family_of", "heldout_prompts", "judge", "parse_prompt", "run_shapes_eval", "save_grid",
           "segment", "truth_layouts", "unseen_phrasing"]
