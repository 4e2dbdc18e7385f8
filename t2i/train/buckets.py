"""Multi-aspect training (SDXL, Podell et al. 2023, sec. 2.3): images grouped into aspect buckets.

A fixed list of (height, width) buckets of about the same pixel count, every side a multiple of
the model's size multiple; each image goes to the bucket nearest its aspect ratio (in log
aspect), is resized so it just covers the bucket, and is cropped only by the excess along one
side (plus at most a pixel of rounding). Every batch is drawn from one bucket. Along with the
images a batch carries SDXL's micro-conditioning (sec. 2.2): the original size (h, w), the crop's
top-left (top, left) in the resized image, and the target size (bucket h, w).

With `zoom` = (p, z), a share p of the images is first enlarged by a factor log-uniform in [1, z]
and then cropped at a random offset: the random crops of larger images that SDXL's crop
conditioning learns from (sec. 2.2: "we uniformly sample crop coordinates"). Bucketing alone crops
only an image's excess over its bucket, a few pixels, too little to learn what a crop looks like.

Which images share a batch is a pure function of the run's data position: items are read in the
source's order (index i of the stream, or a fresh permutation per epoch of a finite source), each
is dropped into its bucket's queue, and a global batch is emitted whenever a queue holds
`batch_size * world_size` items; global batch k is the k-th emitted. Rank r takes slice r of it,
so ranks are disjoint, and a resumed run rebuilds the same batches by replaying the (cheap)
aspect walk, never the images.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from t2i.train.distributed import DistInfo


def aspect_buckets(size: int, multiple: int, max_aspect: float = 2.5) -> list[tuple[int, int]]:
    """(height, width) buckets of about size * size pixels, sides multiples of `multiple`, aspect
    (w / h) within [1 / max_aspect, max_aspect]; sorted by aspect. size 64, multiple 8:
    (40, 104), (40, 96), (48, 88), (48, 80), (56, 72), (64, 64), (72, 56), ... ."""
    if size % multiple:
        raise ValueError(f"image size {size} is not a multiple of the model's size multiple {multiple}")
    area, out = size * size, set()
    for w in range(size, int(size * math.sqrt(max_aspect)) + multiple, multiple):
        h = max(multiple, round(area / w / multiple) * multiple)
        if w / h <= max_aspect:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda b: b[1] / b[0])


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> int:
    """Index of the bucket whose aspect is nearest the image's, in log aspect."""
    a = math.log(width / height)
    return min(range(len(buckets)), key=lambda j: abs(math.log(buckets[j][1] / buckets[j][0]) - a))


def cover_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest size of the image's aspect that covers the bucket: the side that binds is the
    bucket's exactly, the other is rounded up (so the crop along it is the excess, never more)."""
    bh, bw = bucket
    if bh * width >= bw * height:  # relatively taller bucket: height binds
        return bh, max(bw, math.ceil(width * bh / height - 1e-9))
    return max(bh, math.ceil(height * bw / width - 1e-9)), bw


def placement(size: tuple[int, int], bucket: tuple[int, int], gen: torch.Generator | None,
              zoom: tuple[float, float] | None = None) -> tuple[tuple[int, int], int, int]:
    """((resized h, w), top, left) for an image of `size` (h, w) in `bucket`: resized to `cover_size`,
    with `zoom` = (p, z) and a generator enlarged by a factor log-uniform in [1, z] with probability p
    (two draws from gen either way, so an item's draws do not depend on p), then a bucket-sized crop
    at a random offset (gen None: centred, never zoomed)."""
    rh, rw = cover_size(size[0], size[1], bucket)
    if zoom is not None and gen is not None:
        share, top_factor = zoom
        u, f = torch.rand(2, generator=gen).tolist()
        if u < share:
            factor = math.exp(f * math.log(top_factor))
            rh, rw = max(bucket[0], round(rh * factor)), max(bucket[1], round(rw * factor))
    top, left = crop_offset((rh, rw), bucket, gen)
    return (rh, rw), top, left


def fit_to_bucket(image: torch.Tensor, bucket: tuple[int, int], gen: torch.Generator | None,
                  zoom: tuple[float, float] | None = None) -> tuple[torch.Tensor, int, int]:
    """(3, H, W) image -> ((3, bh, bw) crop, top, left), as `placement` says: resized (antialiased
    bilinear) and cropped."""
    (rh, rw), top, left = placement((image.shape[1], image.shape[2]), bucket, gen, zoom)
    if (rh, rw) != tuple(image.shape[1:]):
        image = F.interpolate(image[None], (rh, rw), mode="bilinear", antialias=True, align_corners=False)[0]
    return image[:, top:top + bucket[0], left:left + bucket[1]], top, left


def crop_offset(resized: tuple[int, int], bucket: tuple[int, int],
                gen: torch.Generator | None) -> tuple[int, int]:
    """(top, left) of a uniformly random bucket-sized crop of a `resized` (h, w) image; the centred
    one (rounded down) when gen is None."""
    if gen is None:
        return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    top = int(torch.randint(0, resized[0] - bucket[0] + 1, (), generator=gen))
    left = int(torch.randint(0, resized[1] - bucket[1] + 1, (), generator=gen))
    return top, left


class SizedSource(Protocol):
    """Items at their own sizes. `sizes(indices)` must be cheap (no decoding): the bucket walk
    calls it for every item of the run so far when it resumes."""

    length: int | None  # None: an endless stream read in index order

    def sizes(self, indices: np.ndarray) -> np.ndarray: ...  # (N, 2) original (height, width)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]: ...  # (3, H, W) in [-1, 1], caption


class BucketedData:
    """`batch(position, batch_size, info)` over aspect buckets (module docstring); `time_ids` gives
    the same batch's micro-conditioning. Every call with the same global batch size shares the
    walk (memoised), so a run's steps cost O(new items)."""

    CHUNK = 4096  # items whose sizes the walk reads at once

    def __init__(self, source: SizedSource, buckets: list[tuple[int, int]], seed: int, center: bool = False,
                 zoom: tuple[float, float] | None = None) -> None:
        """center: crop the middle of the excess instead of a random offset (with one square bucket,
        the centre-crop training SDXL's buckets are compared against). zoom: (share, largest factor) of
        the random crops of enlarged images (module docstring)."""
        if zoom is not None:
            if center:
                raise ValueError("random crops of enlarged images (zoom) and centre crops exclude each other")
            if not (0 < zoom[0] <= 1 and 1 < zoom[1] <= 4):
                raise ValueError(f"zoom needs a share in (0, 1] and a factor in (1, 4], got {zoom}")
        self.source, self.buckets, self.seed, self.center, self.zoom = source, buckets, seed, center, zoom
        self._walk: dict[int, tuple[list[tuple[int, list[int]]], list[list[int]], int]] = {}

    def _order(self, start: int, stop: int) -> np.ndarray:
        """Source indices of stream positions [start, stop): the identity for an endless source,
        else one permutation per epoch seeded by (seed, epoch), as `batch_indices` walks it."""
        pos = np.arange(start, stop)
        n = self.source.length
        if n is None:
            return pos
        out = np.empty_like(pos)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = np.random.default_rng([self.seed, int(epoch)]).permutation(n)[pos[sel] % n]
        return out

    def global_batch(self, k: int, global_size: int) -> tuple[int, list[int]]:
        """(bucket index, source indices) of global batch k when global batches hold `global_size`."""
        emitted, queues, read = self._walk.setdefault(global_size, ([], [[] for _ in self.buckets], 0))
        while len(emitted) <= k:
            idx = self._order(read, read + self.CHUNK)
            read += self.CHUNK
            for i, (h, w) in zip(idx.tolist(), self.source.sizes(idx).tolist(), strict=True):
                j = nearest_bucket(self.buckets, h, w)
                queues[j].append(i)
                if len(queues[j]) == global_size:
                    emitted.append((j, queues[j]))
                    queues[j] = []
        self._walk[global_size] = (emitted, queues, read)
        return emitted[k]

    def _share(self, position: int, batch_size: int, info: DistInfo) -> tuple[int, list[int]]:
        g = batch_size * info.world_size
        if position % g:
            raise ValueError(f"data position {position} is not a multiple of the global batch {g}")
        j, idx = self.global_batch(position // g, g)
        return j, idx[info.rank * batch_size:(info.rank + 1) * batch_size]

    def _crop_generator(self, i: int) -> torch.Generator | None:
        if self.center:
            return None
        # SeedSequence, not hash(): Python salts str hashes per process, and a resumed run must match.
        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, i, 2]).generate_state(1)[0]))

    def batch(self, position: int, batch_size: int, info: DistInfo) -> tuple[torch.Tensor, list[str], list[int]]:
        """This rank's share of the global batch at `position`: images (B, 3, bh, bw) of one
        bucket, captions, source indices."""
        j, idx = self._share(position, batch_size, info)
        images, captions = [], []
        for i in idx:
            image, caption = self.source[i]
            images.append(fit_to_bucket(image, self.buckets[j], self._crop_generator(i), self.zoom)[0])
            captions.append(caption)
        return torch.stack(images), captions, idx

    def time_ids(self, position: int, batch_size: int, info: DistInfo) -> torch.Tensor:
        """(B, 6) float32 micro-conditioning of the same share: original h, w, crop top, left,
        target h, w (SDXL's order), without decoding any image."""
        j, idx = self._share(position, batch_size, info)
        bh, bw = self.buckets[j]
        rows = []
        for i, (h, w) in zip(idx, self.source.sizes(np.asarray(idx)).tolist(), strict=True):
            # the draws `fit_to_bucket` makes for item i
            _, top, left = placement((h, w), (bh, bw), self._crop_generator(i), self.zoom)
            rows.append([h, w, top, left, bh, bw])
        return torch.tensor(rows, dtype=torch.float32)


class ShapesCanvases:
    """The shapes world at many aspect ratios and resolutions, a `SizedSource`: item i is scene i
    of `seed` (`shapes_example`) moved onto a canvas of aspect w / h log-uniform in
    [1 / max_aspect, max_aspect] and about 64 x 64 world units (`place_on_canvas`), rendered at
    `size` pixels per 64 units times a resolution factor log-uniform in `scale` (so originals are
    smaller and larger than the buckets, as SDXL's size conditioning needs). When the scene does
    not fit its canvas, the next draw of a disjoint index range is used."""

    length = None

    def __init__(self, seed: int, size: int, max_aspect: float = 2.5, scale: tuple[float, float] = (0.5, 1.25),
                 background_p: float | None = None) -> None:
        self.seed, self.size, self.max_aspect, self.scale = seed, size, max_aspect, scale
        self.background_p = background_p

    def _geometry(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Canvas width, height (world units) and pixels per 64 units of each index: a pure function
        of (seed, index), drawn a chunk of BucketedData.CHUNK indices at a time."""
        chunk = BucketedData.CHUNK
        u = np.empty((len(indices), 2))
        for c in np.unique(indices // chunk):
            sel = indices // chunk == c
            u[sel] = np.random.default_rng([self.seed, int(c), 3]).random((chunk, 2))[indices[sel] % chunk]
        aspect = np.exp((2 * u[:, 0] - 1) * math.log(self.max_aspect))
        lo, hi = (math.log(s) for s in self.scale)
        pixels = self.size * np.exp(lo + u[:, 1] * (hi - lo))
        return np.rint(64 * np.sqrt(aspect)).astype(int), np.rint(64 / np.sqrt(aspect)).astype(int), pixels

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        w, h, pixels = self._geometry(np.asarray(indices))
        # render_array's own rounding of canvas * size / 64
        return np.stack([[round(hh * (p / 64)), round(ww * (p / 64))] for ww, hh, p in zip(w, h, pixels, strict=True)]
                        ).reshape(-1, 2)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from t2i.data.shapes import BACKGROUND_P
        from t2i.data.shapes.datasets import shapes_example, to_tensor
        from t2i.data.shapes.rendering import render_array
        from t2i.data.shapes.sampling import place_on_canvas

        ws, hs, ps = self._geometry(np.asarray([i]))
        w, h, pixels = int(ws[0]), int(hs[0]), float(ps[0])
        p = BACKGROUND_P if self.background_p is None else self.background_p
        for attempt in range(100):
            scene, caption = shapes_example(self.seed, i + (attempt << 48), background_p=p)
            placed = place_on_canvas(scene, w, h)
            if placed is not None:
                return to_tensor(render_array(placed, pixels, (w, h))), caption
        raise RuntimeError(f"no scene of seed {self.seed} fits a {w}x{h} canvas (item {i})")
