"""Captioned images from disk: an image folder with `.txt` caption sidecars (the usual
fine-tuning layout, `cat.png` + `cat.txt`), or a JSONL manifest with one
`{"image": path, "text": caption}` object per line.

A corrupt or unreadable image never crashes a run: it is skipped (the next readable item
takes its place), counted, and named once in the log. That includes an image too large to
decode safely (PIL's decompression-bomb limit, ~179 megapixels). A caption sidecar that is not
UTF-8 (or cannot be read) is not guessed at: its image is left out of the data set, and the
caption file is named in the log.

`SizedImages` serves the same items at their own sizes, for aspect-bucketed training
(`t2i.train.buckets`): sizes come from the image headers, the pixels are read only for a batch.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What PIL raises for an image it cannot read: the first three for broken files, DecompressionBombError
# (a plain Exception) for one whose pixel count would take gigabytes to decode.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
        return to_tensor(im)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def record_skip(skipped: dict[str, str], log: Callable[[str], None], path: Path, e: Exception) -> None:
    """Count an unreadable image in `skipped` ({path: reason}) and name it in the log."""
    skipped[str(path)] = f"{type(e).__name__}: {e}"
    log(f"skipping unreadable image {path} ({type(e).__name__}: {e}); {len(skipped)} skipped so far")


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
            except UNREADABLE as e:
                record_skip(self.skipped, self.log, path, e)
        raise ValueError("no readable image in the dataset")


def image_folder(root: str | Path, size: int, log: Callable[[str], None] = _warn) -> CaptionedImages:
    """`folder_items` as (3, size, size) squares."""
    return CaptionedImages(folder_items(root, log), size, log)


def folder_items(root: str | Path, log: Callable[[str], None] = _warn) -> list[tuple[Path, str]]:
    """(path, caption) of all images under `root` (recursively, sorted by path) with captions from
    `<stem>.txt`.

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
    return items


def jsonl_manifest(path: str | Path, size: int, log: Callable[[str], None] = _warn) -> CaptionedImages:
    """`manifest_items` as (3, size, size) squares."""
    return CaptionedImages(manifest_items(path), size, log)


def manifest_items(path: str | Path) -> list[tuple[Path, str]]:
    """(path, caption) items from a JSONL file of `{"image": path, "text": caption}`; relative image
    paths are resolved against the manifest's folder. A malformed line is an error naming its number."""
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
    return items


def read_factor(height: int, width: int, min_side: int | None) -> int:
    """The integer factor an image of (height, width) is reduced by when read: the largest that divides
    both sides (so its aspect, and with it every bucket placement, stays exact) while the shorter side
    stays at least `min_side`; 1 (full size) when there is none, or min_side is None. 4000x6000 with
    min_side 256: 10 (400x600); 4001x6000: 1."""
    if min_side is None:
        return 1
    g = math.gcd(height, width)
    return next((d for d in range(min(height, width) // min_side, 1, -1) if g % d == 0), 1)


class SizedImages:
    """The items of `folder_items` / `manifest_items` at their own sizes, a `SizedSource` for aspect
    buckets (`t2i.train.buckets.BucketedData`): item i -> ((3, H, W) in [-1, 1], caption), the whole
    image, neither resized to a bucket nor cropped (`fit_to_bucket` does that, where the placement is
    drawn).

    `sizes` reads (height, width) from the image headers, lazily and cached per item, never the pixels:
    the bucket walk asks for the size of every item of a run so far when it resumes. EXIF orientation is
    applied neither to the sizes nor to the pixels (as `load_image` does not): the two always agree.

    Unreadable images as in `CaptionedImages`: skipped, counted in `skipped`, named once in the log, the
    next readable item taking their place. So that the walk stays a pure function of the files (the same
    batches on resume):
    - a header that cannot be read: item i is, in size, pixels and caption, the next item whose header
      reads; the sizes pass finds that, and a resumed run finds the same;
    - pixels that cannot be decoded behind a readable header (a truncated file): the next decodable
      item, resized and centre-cropped to the size that header gave, so that the bucket the walk chose
      and the batch's micro-conditioning (`BucketedData.time_ids`) still describe the pixels given.

    min_side: a large original is reduced at read time (`read_factor`: an integer factor dividing both
    sides, the shorter kept at least min_side; None: never; `open_data`: 2x the bucket size, times the
    largest crop zoom). Why: memory and time; a 24-megapixel photo is a 290 MB float tensor and an
    antialiased resize of that size at every use, to make a crop of a bucket's size. The reduction keeps
    the aspect exact, so the crop placed on the reduced image is the one placed on the true size, and
    `sizes` (SDXL's original size) stays the true size.
    """

    def __init__(self, items: list[tuple[Path, str]], log: Callable[[str], None] = _warn,
                 min_side: int | None = None) -> None:
        if not items:
            raise ValueError("the dataset holds no images")
        self.items, self.log, self.min_side = items, log, min_side
        self.length = len(items)
        self.skipped: dict[str, str] = {}
        self._headers: dict[int, tuple[int, int] | None] = {}  # index -> (height, width); None: unreadable

    def __len__(self) -> int:
        return self.length

    def _header(self, i: int) -> tuple[int, int] | None:
        if i not in self._headers:
            path = self.items[i][0]
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
                self._headers[i] = (h, w)
            except UNREADABLE as e:
                self._headers[i] = None
                record_skip(self.skipped, self.log, path, e)
        return self._headers[i]

    def _stand_in(self, i: int) -> int:
        """The first item from i on (cyclically) whose header reads: i itself when its header does."""
        n = self.length
        for k in range(n):
            if self._header((i + k) % n) is not None:
                return (i + k) % n
        raise ValueError("no image in the dataset has a readable header")

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        """(N, 2) int64 original (height, width) of the items, from their headers."""
        rows = [self._header(self._stand_in(i)) for i in np.asarray(indices).reshape(-1).tolist()]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """((3, H, W) in [-1, 1], caption): (H, W) is `sizes` of i, divided by `read_factor`."""
        j = self._stand_in(i)
        h, w = self._header(j)
        d = read_factor(h, w, self.min_side)
        for k in range(self.length):
            path, caption = self.items[(j + k) % self.length]
            if str(path) in self.skipped:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if im.size != (w, h):  # a stand-in for undecodable pixels: their header's size
                        im = ImageOps.fit(im, (w // d, h // d), Image.Resampling.LANCZOS)
                    elif d > 1:
                        im = im.reduce(d)  # box average over d x d: exact (d divides both sides)
                    return to_tensor(im), caption
            except UNREADABLE as e:
                record_skip(self.skipped, self.log, path, e)
        raise ValueError("no readable image in the dataset")
