"""Rendering a scene at any size: anti-aliased edges by area coverage, exact interiors, and the
ground-truth object masks.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from t2i.data.shapes.world import BACKGROUND_RGB, CANVAS, PALETTE, RING_HOLE, Scene


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
    elif shape == "ring":  # outside the v1 contract (world.NEW_SHAPES): the inscribed disc less a hole
        r2 = du * du + dv * dv
        inside = inside & (r2 <= 0.25) & (r2 >= 0.25 * RING_HOLE**2)
    elif shape != "square":
        raise ValueError(f"unknown shape {shape!r}")
    h, w = r1 - r0, c1 - c0
    cov = inside.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)
    return slice(r0, r1), slice(c0, c1), cov


def render_array(scene: Scene, size: int = CANVAS, canvas: tuple[int, int] = (CANVAS, CANVAS)) -> np.ndarray:
    """The scene as a uint8 array; edges anti-aliased, interiors exact.

    canvas: the scene's (width, height) in world units (64 per side of the square world;
    `place_on_canvas` lays scenes out on other aspect ratios). `size` is the pixel size of 64
    world units, so the array is (height * size / 64, width * size / 64, 3): (size, size, 3)
    for the square world.
    """
    k = size / CANVAS
    width, height = round(canvas[0] * k), round(canvas[1] * k)
    img = np.empty((height, width, 3), np.float32)
    img[:] = BACKGROUND_RGB[scene.background]
    for obj in scene.objects:
        rows, cols, cov = shape_coverage(obj.shape, tuple(v * k for v in obj.box), height, width)
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
