"""The shapes world's contract (docs/SHAPES_WORLD.md describes it; this module holds the exact values, keep them): the
palette, sizes and layout rules, the scene model, and the geometric truths captions state.

Geometry is kept in 64x64 canvas units (integer boxes) and scaled to the output size at
render time; the caption rules (regions, relations) are read on those 64x64 units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from t2i.data import captions as lang

CANVAS = 64  # all geometry below is in units of a 64x64 canvas
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (30, 170, 60), "blue": (35, 70, 230), "yellow": (245, 215, 20),
    "purple": (140, 45, 200), "orange": (250, 135, 0), "cyan": (0, 200, 215), "pink": (250, 120, 190),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                   "gray": (128, 128, 128)}
SHAPES = lang.SHAPES
# Shapes outside the v1 contract, {name: plural}: never sampled, captioned or judged unless asked for
# (`t2i.data.shapes.new_words`, the judge's `new_shapes=`). They give the built-in model a word it never
# saw (issue 21's LoRA / textual-inversion demonstration). A shape rather than a colour: the built-in
# autoencoder, trained on the 8 palette colours only, decodes any other colour as a palette one (brown
# comes back olive-green), while it reconstructs new geometry in palette colours (a ring: IoU 0.89-0.94).
NEW_SHAPES: dict[str, str] = {"ring": "rings"}
RING_HOLE = 0.5  # a ring's inner radius over its outer radius (the outer circle is the box's inscribed disc)
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
