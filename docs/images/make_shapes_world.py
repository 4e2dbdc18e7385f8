"""Draw docs/images/shapes_world.png: scenes of the shapes world with their captions.

Every tile is rendered by t2i's own data generator (`t2i.data.shapes`), the same code that makes
the built-in model's training data, and captioned with the scene's primary caption, so the picture
shows exactly what the model was taught. Run from the repository root:

    python docs/images/make_shapes_world.py
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2i.data.shapes import FAMILIES, captions, render, sample_scene

OUT = Path(__file__).with_name("shapes_world.png")
SEED = 3
TILE = 128      # px per rendered scene (the world renders at any size; the model's is 64)
PAD = 8         # px around each tile
LINES = 5       # caption lines under each tile (the longest captions need 5)
LINE_H = 14     # px per caption line
COLUMNS = 6


def tiles(seed: int = SEED, rounds: int = 2) -> list[tuple[Image.Image, str]]:
    """`rounds` scenes of every caption family, each with its primary caption."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        for family in FAMILIES:
            scene = sample_scene(rng, family=family)
            out.append((render(scene, TILE), captions(scene, rng)[0]))
    return out


def grid(items: list[tuple[Image.Image, str]]) -> Image.Image:
    font = ImageFont.load_default(size=11)
    cell_w, cell_h = TILE + 2 * PAD, TILE + 2 * PAD + LINES * LINE_H
    rows = -(-len(items) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * cell_w, rows * cell_h), (246, 246, 244))
    draw = ImageDraw.Draw(sheet)
    chars = int(TILE / 6.2)  # about this many characters of an 11 px font fit across a tile
    for i, (image, caption) in enumerate(items):
        x, y = (i % COLUMNS) * cell_w + PAD, (i // COLUMNS) * cell_h + PAD
        sheet.paste(image, (x, y))
        draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=(200, 200, 200))
        lines = textwrap.wrap(caption, chars)
        assert len(lines) <= LINES, f"caption too long for its tile: {caption!r}"
        for k, line in enumerate(lines):
            draw.text((x, y + TILE + 4 + k * LINE_H), line, fill=(30, 30, 30), font=font)
    return sheet


if __name__ == "__main__":
    grid(tiles()).save(OUT, optimize=True)
    print(f"{OUT}: {OUT.stat().st_size / 1024:.0f} KB")
