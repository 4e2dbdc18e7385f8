"""Captioned images from disk: an image folder with `.txt` caption sidecars (the usual
fine-tuning layout, `cat.png` + `cat.txt`), or a JSONL manifest with one
`{"image": path, "text": caption}` object per line.

A corrupt or unreadable image never crashes a run: it is skipped (the next readable item
takes its place), counted, and named once in the log. That includes an image too large to
decode safely (PIL's decompression-bomb limit, ~179 megapixels). A caption sidecar that is not
UTF-8 (or cannot be read) is not guessed at: its image is left out of the data set, and the
caption file is named in the log.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image as RGB, resize its short side to `size` and center-crop to a square.

    Returns (3, size, size) float32 in [-1, 1]. Raises OSError/ValueError for unreadable files.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        if scale != 1:
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            im = im.resize(new, Image.Resampling.LANCZOS)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class CaptionedImages:
    """A finite dataset of (image path, caption) pairs; item i -> ((3, S, S) in [-1, 1], caption).

    Unreadable images are replaced by the next readable item, counted in `skipped`
    ({path: reason}) and reported through `log` the first time they are met.
    """

    def __init__(self, items: list[tuple[Path, str]], size: int, log: Callable[[str], None] = _warn) -> None:
        if not items:
            raise ValueError("the dataset holds no images")
        self.items = items
        self.size = size
        self.log = log
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        n = len(self.items)
        for k in range(n):
            path, caption = self.items[(i + k) % n]
            if str(path) in self.skipped:
                continue
            try:
                return load_image(path, self.size), caption
            # PIL raises the first three for broken files; DecompressionBombError (a plain Exception) for
            # an image whose pixel count would take gigabytes to decode.
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self.skipped[str(path)] = f"{type(e).__name__}: {e}"
                self.log(f"skipping unreadable image {path} ({type(e).__name__}: {e}); "
                         f"{len(self.skipped)} skipped so far")
        raise ValueError("no readable image in the dataset")


def image_folder(root: str | Path, size: int, log: Callable[[str], None] = _warn) -> CaptionedImages:
    """All images under `root` (recursively, sorted by path) with captions from `<stem>.txt`.

    An image without a sidecar gets the empty caption (an unconditional example); how many
    did is logged.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    items, missing, bad = [], 0, 0
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            txt = p.with_suffix(".txt")
            if txt.is_file():
                try:
                    caption = txt.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as e:
                    bad += 1
                    log(f"skipping {p.name}: its caption {txt} cannot be read as UTF-8 text "
                        f"({type(e).__name__}: {e}); {bad} skipped so far")
                    continue
            else:
                caption, missing = "", missing + 1
            items.append((p, caption))
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) with readable captions found under {root}")
    if missing:
        log(f"{missing} of {len(items)} images in {root} have no .txt caption: trained as unconditional")
    return CaptionedImages(items, size, log)


def jsonl_manifest(path: str | Path, size: int, log: Callable[[str], None] = _warn) -> CaptionedImages:
    """Items from a JSONL file of `{"image": path, "text": caption}`; relative image paths are
    resolved against the manifest's folder. A malformed line is an error naming its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the manifest is not UTF-8 text ({e})") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, text = rec["image"], rec.get("text", "")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            msg = f"{path}:{n}: expected a JSON object with \"image\" and \"text\" ({e})"
            raise ValueError(msg) from None
        if not isinstance(image, str) or not isinstance(text, str):
            raise ValueError(f"{path}:{n}: \"image\" and \"text\" must be strings")
        items.append((path.parent / image, text))
    return CaptionedImages(items, size, log)
