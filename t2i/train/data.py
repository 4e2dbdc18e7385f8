"""Training data: `batch(position, batch_size, info)` -> this rank's images, captions and indices.

A run's data position (samples consumed, over all ranks) is all that is needed to resume it
exactly. The shapes world, folders and manifests are indexed (`t2i.train.loop.batch_indices`), or
walked in aspect buckets (`t2i.train.buckets`); WebDataset shards are a stream whose order is a pure
function of the position (`t2i.data.webdataset`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from t2i.train.distributed import DistInfo
from t2i.train.loop import batch_indices


class IndexedData(Protocol):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]: ...


class BatchSource(Protocol):
    def batch(self, position: int, batch_size: int, info: DistInfo) -> tuple[torch.Tensor, list[str], list[int]]: ...


class TrainData:
    """A source and its length (None: the endless shapes stream, read in index order)."""

    def __init__(self, source: IndexedData, length: int | None, seed: int) -> None:
        self.source, self.length, self.seed = source, length, seed

    def batch(self, position: int, batch_size: int, info: DistInfo) -> tuple[torch.Tensor, list[str], list[int]]:
        """This rank's share of the global batch at `position`: images (B, 3, S, S), captions, indices."""
        idx = batch_indices(position, batch_size, info, self.length, self.seed)
        items = [self.source[i] for i in idx]
        return torch.stack([im for im, _ in items]), [c for _, c in items], idx


def open_data(kind: str, path: str | None, size: int, seed: int, log: Callable[[str], None] = print,
              background_p: float | None = None, workers: int = 0,
              size_multiple: int | None = None, center_crop: bool = False,
              crop_zoom: tuple[float, float] | None = None) -> BatchSource:
    """kind: "shapes" (the endless world of `seed`), "folder" (images + .txt sidecars under
    `path`), "jsonl" (a manifest at `path`) or "webdataset" (tar shards: a folder of them or a
    brace pattern at `path`, read by `workers` loader processes; the families pass the run's
    `data_workers` for their training source).
    background_p: the shapes world's share of black/gray backgrounds (None: the world's own).
    size_multiple: multi-aspect training (`t2i.train.buckets`) in buckets of about size x size pixels
    whose sides are multiples of this: the shapes world at many aspect ratios, or a folder's / manifest's
    images at their own sizes (`t2i.data.folder.SizedImages`); None: square. center_crop: the same
    many-aspect images, each centre-cropped to size x size (the baseline that aspect buckets are measured
    against). crop_zoom: with buckets, (share, largest factor) of images enlarged and randomly cropped
    (`t2i.train.buckets`). WebDataset shards are not bucketed: the walk needs every item's size ahead of
    its batch, and a stream of shards has no cheap look at them."""
    if kind != "shapes":
        if background_p is not None:
            raise ValueError(f"--background-p applies to --data shapes only, not --data {kind}")
        if path is None:
            raise ValueError(f"--data {kind} needs --data-path")
    if size_multiple is not None or center_crop:
        if kind == "webdataset":
            raise ValueError("aspect buckets (--aspect-buckets, --center-crop) read --data shapes, folder or jsonl, "
                             "not --data webdataset: the bucket walk needs every image's size ahead of its batch, "
                             "which a stream of tar shards does not give")
        from t2i.train.buckets import BucketedData, ShapesCanvases, aspect_buckets

        buckets = [(size, size)] if center_crop else aspect_buckets(size, size_multiple)
        if kind == "shapes":
            source = ShapesCanvases(seed, size, background_p=background_p)
        else:
            from t2i.data.folder import SizedImages, folder_items, manifest_items

            items = folder_items(path, log) if kind == "folder" else manifest_items(path)
            # Large originals are reduced, their shorter side kept at least 2x size times the largest zoom:
            # a crop's resize covers the bucket, so its shorter side is at most a bucket side, about 1.6x
            # size at most, times the zoom; no crop is then made from fewer pixels than it has.
            zoom = 1.0 if crop_zoom is None else crop_zoom[1]
            source = SizedImages(items, log, min_side=math.ceil(2 * size * zoom))
        return BucketedData(source, buckets, seed, center_crop, crop_zoom)
    if kind == "shapes":
        from t2i.data.shapes import BACKGROUND_P, ShapesDataset

        # ShapesDataset is random access by index; an effectively endless one is the stream.
        p = BACKGROUND_P if background_p is None else background_p
        return TrainData(ShapesDataset(2**62, seed=seed, size=size, background_p=p), None, seed)
    if kind == "webdataset":
        from t2i.data.webdataset import WebDatasetSource

        return WebDatasetSource(path, size, seed, workers, log)
    from t2i.data.folder import image_folder, jsonl_manifest

    ds = image_folder(path, size, log) if kind == "folder" else jsonl_manifest(path, size, log)
    return TrainData(ds, len(ds), seed)
