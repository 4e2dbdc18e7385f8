"""A tiny captioned image folder (the `--data folder` layout: PNGs with .txt caption sidecars) for the
training tests of LoRA, textual inversion and full fine-tuning."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

COLOURS = {"red": (230, 30, 30), "blue": (30, 60, 230), "green": (30, 200, 60), "yellow": (240, 220, 30)}


def write_captioned_folder(folder: Path, size: int = 16, sizes: list[tuple[int, int]] | None = None) -> Path:
    """One image per colour: a square of it on black, captioned `a <colour> square` in a .txt sidecar.
    sizes: (height, width) of each image instead, the colours taken in turn (files `<k>_<colour>.png`)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    shapes = [(f"{name}", (size, size), name) for name in names] if sizes is None else [
        (f"{k}_{names[k % len(names)]}", hw, names[k % len(names)]) for k, hw in enumerate(sizes)]
    for stem, (h, w), name in shapes:
        image = Image.new("RGB", (w, h))
        image.paste(COLOURS[name], (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {name} square")
    return folder
