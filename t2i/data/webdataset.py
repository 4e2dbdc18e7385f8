"""Captioned images in WebDataset tar shards (the layout img2dataset writes for LAION): members
`{key}.png|jpg|jpeg|webp`, `{key}.txt` (the caption) and optionally `{key}.json`, grouped by key.

Tar members are read and grouped by the `webdataset` library (`tarfile_samples`); the data
position is ours. The library's stream has no positional resume (its shard and worker splits and
shuffles are a pipeline that restarts from the beginning), so the order of samples is defined
here as a pure function of (seed, world size, loader workers), and any position in it can be
reached by skipping whole shards by their member counts and then members of one shard:

- the shards are dealt round-robin (after one seeded shuffle) to W x K *slots*, K = max(1, loader
  workers) per rank: slot g = rank * K + w reads only its own shards, so ranks (and workers) read
  disjoint samples;
- a slot's stream walks its shards epoch after epoch, in a fresh seeded order each epoch, and the
  members of a shard in tar order;
- a rank's stream interleaves its K slots: rank-local sample k is sample k // K of slot k % K.
  Under `fit`, rank r's batch at the global position p is its samples [p / W, p / W + B).

A sample whose image cannot be decoded (or that has none, or a caption that is not UTF-8) is
skipped as in `t2i.data.folder`: the next readable sample of its slot takes its place, and it is
counted and named once in the log. Replacing rather than dropping keeps every index a pure
function of the position, so a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i.data.folder import load_image

if TYPE_CHECKING:
    from t2i.train.distributed import DistInfo

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def write_shapes_shards(n: int, out_dir: str | Path, seed: int = 0, size: int = 64, shard_size: int = 1000,
                        ) -> list[Path]:
    """The first n scenes of the shapes world of `seed` as `shard-000000.tar`, ... of `shard_size` samples:
    `{i:06d}.png` (size x size), `.txt` (the training caption) and `.json` (the scene's truth). Returns the
    shard paths. Written with webdataset's ShardWriter; member times are fixed, so the bytes are a pure
    function of the arguments."""
    import webdataset as wds

    from t2i.data.shapes import default_exclude, render, shapes_example

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exclude = default_exclude()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for i in range(n):
            scene, caption = shapes_example(seed, i, exclude)
            png = io.BytesIO()
            render(scene, size).save(png, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": png.getvalue(), "txt": caption,
                        "json": json.dumps({"text": caption, **scene.to_dict(size)})})
    return sorted(out.glob("shard-*.tar"))


def shard_list(spec: str) -> list[str]:
    """The shards of `--data-path`: every `*.tar` in a folder (sorted), or a brace pattern
    (`DIR/shard-{000000..000009}.tar`, expanded as webdataset does). A listed shard must exist."""
    from webdataset.shardlists import expand_urls

    if Path(spec).is_dir():
        shards = [str(p) for p in sorted(Path(spec).glob("*.tar"))]
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {spec}")
        return shards
    shards = expand_urls(spec)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[0]}")
    return shards


def _key(name: str) -> str | None:
    """A member's sample key as webdataset groups them (`a/b.c.png` -> `a/b`); None for no key."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)[0]


def count_samples(shard: str) -> int:
    """Samples (runs of members with one key) in a shard, from its headers alone (seeking over the
    data). A shard cut short counts the samples whose headers were read."""
    n, last = 0, None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key = _key(member.name) if member.isreg() and not member.name.startswith("__") else None
                if key is not None and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError):
        pass  # the stream reader meets the same damage and reports the samples it cannot read
    return n


@dataclass
class Sample:
    key: str  # "<shard>:<member key>"
    image: torch.Tensor  # (3, S, S) in [-1, 1]
    caption: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) met before this one


def decode(raw: dict, size: int) -> tuple[torch.Tensor, str]:
    """A webdataset sample dict -> ((3, S, S) image in [-1, 1], caption). Raises ValueError or the
    decoder's error for a sample that cannot be used."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise ValueError(f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    return load_image(io.BytesIO(raw[ext]), size), caption  # type: ignore[arg-type]


def shard_entries(shard: str, count: int) -> Iterator[dict | None]:
    """Exactly `count` entries of a shard, in tar order: webdataset's sample dicts, or None where the
    shard is damaged (its stream then ends early; the positions stay those of the header count)."""
    from webdataset.tariterators import tarfile_samples

    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:  # the handler webdataset calls: record the damage, end this shard
        errors.append(exn)
        return False

    n = 0
    for raw in tarfile_samples([{"url": shard}], handler=stop):
        if n == count:
            return
        yield raw
        n += 1
    yield from (None for _ in range(count - n))


class ShardStreams:
    """The sample order of a list of shards for one (seed, world size, loader workers): see the module
    docstring. Picklable (loader workers get a copy); counts are cached per process."""

    def __init__(self, shards: list[str], size: int, seed: int, slots_per_rank: int) -> None:
        self.shards, self.size, self.seed, self.per_rank = shards, size, seed, slots_per_rank
        self.counts: dict[str, int] = {}

    def slot_shards(self, slot: int, world: int) -> list[str]:
        total = world * self.per_rank
        if len(self.shards) < total:
            raise ValueError(f"{len(self.shards)} shards cannot be split over {world} rank(s) x {self.per_rank} "
                             "loader slot(s): write smaller shards (--shard-size) or use fewer workers")
        order = np.random.default_rng([self.seed, 7]).permutation(len(self.shards))
        return [self.shards[i] for i in order[slot::total]]

    def count(self, shard: str) -> int:
        if shard not in self.counts:
            self.counts[shard] = count_samples(shard)
        return self.counts[shard]

    def epoch_order(self, shards: list[str], slot: int, epoch: int) -> list[str]:
        return [shards[i] for i in np.random.default_rng([self.seed, slot, epoch]).permutation(len(shards))]

    def locate(self, shards: list[str], slot: int, index: int) -> tuple[int, int, int]:
        """Slot-local sample `index` -> (epoch, shard number in that epoch's order, member offset)."""
        length = sum(self.count(s) for s in shards)
        if length == 0:
            raise ValueError(f"the shards of loader slot {slot} hold no samples: {shards[:3]}...")
        epoch, index = divmod(index, length)
        for j, shard in enumerate(self.epoch_order(shards, slot, epoch)):
            if index < self.count(shard):
                return epoch, j, index
            index -= self.count(shard)
        raise AssertionError("unreachable: index < epoch length")

    def slot_stream(self, slot: int, world: int, start: int) -> Iterator[Sample]:
        """Slot `slot`'s samples from slot-local index `start` on, endless. An unreadable sample is
        replaced by the next readable one (and reported with it)."""
        shards = self.slot_shards(slot, world)
        epoch, j, offset = self.locate(shards, slot, start)
        skipped: list[tuple[str, str]] = []
        pending = 0  # unreadable samples waiting for the next readable one to take their places
        while True:
            for shard in self.epoch_order(shards, slot, epoch)[j:]:
                for m, raw in enumerate(shard_entries(shard, self.count(shard))):
                    if m < offset:
                        continue  # before the start: skipped unread (no decoding)
                    key = f"{Path(shard).name}:{raw['__key__'] if raw else f'#{m}'}"
                    try:
                        if raw is None:
                            raise ValueError("the shard ends (is damaged) before this sample")
                        image, caption = decode(raw, self.size)
                    # PIL raises the first three for broken files; DecompressionBombError for a huge image;
                    # UnicodeDecodeError is a ValueError (a caption that is not UTF-8).
                    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                        skipped.append((key, f"{type(e).__name__}: {e}"))
                        pending += 1
                        if len(skipped) > sum(self.count(s) for s in shards):
                            raise ValueError(f"no readable sample in the shards of loader slot {slot}") from None
                        continue
                    for _ in range(pending + 1):
                        yield Sample(key, image, caption, skipped)
                        skipped = []
                    pending = 0
                offset = 0
            epoch, j = epoch + 1, 0


class _SlotDataset(IterableDataset):
    """A rank's stream split over DataLoader workers: worker w serves slot (k0 + w) % K from its sample
    (k0 + w) // K, so the loader's round-robin over workers yields the rank's samples k0, k0 + 1, ..."""

    def __init__(self, streams: ShardStreams, info: DistInfo, start: int) -> None:
        self.streams, self.info, self.start = streams, info, start

    def __iter__(self) -> Iterator[Sample]:
        worker = get_worker_info()
        w = 0 if worker is None else worker.id
        k = self.start + w
        per_rank = self.streams.per_rank
        return self.streams.slot_stream(self.info.rank * per_rank + k % per_rank, self.info.world_size,
                                        k // per_rank)


def _identity(x: Sample) -> Sample:
    return x


class WebDatasetSource:
    """Training data from tar shards, read as a stream; `batch` has `TrainData.batch`'s contract.

    workers: DataLoader processes that read and decode (0: in the calling thread). It is part of the
    sample order (each worker reads its own shards), so a resumed run keeps the saved value.
    """

    def __init__(self, spec: str, size: int, seed: int, workers: int = 0,
                 log: Callable[[str], None] = _warn) -> None:
        self.streams = ShardStreams(shard_list(spec), size, seed, max(1, workers))
        self.workers, self.log = workers, log
        self.skipped: dict[str, str] = {}
        self._at: tuple[DistInfo, int] | None = None  # (info, next rank-local index) of the open stream
        self._stream: Iterator[Sample] | None = None

    def _open(self, info: DistInfo, start: int) -> Iterator[Sample]:
        self.streams.slot_shards(0, info.world_size)  # too few shards for the slots: say so here, not in a worker
        dataset = _SlotDataset(self.streams, info, start)
        if self.workers == 0:
            return iter(dataset)
        # Workers are forked by a fork server that has imported this module (and torch) once: `fit` opens the
        # loader from its prefetch thread, and a child forked from a thread that is not the main one fails at
        # exit (exit code 1, which the DataLoader raises in the main thread) and may inherit locks other
        # threads held; spawn would import torch again for every worker and every seek. Its own generator:
        # the workers' base seed (unused) would otherwise be drawn from the global RNG, which a resumed run
        # restores before it opens its stream and an uninterrupted one after.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                               prefetch_factor=4, generator=torch.Generator().manual_seed(0),
                               multiprocessing_context=context))

    def samples(self, position: int, batch_size: int, info: DistInfo) -> list[Sample]:
        """This rank's `batch_size` samples at the global data position `position` (all ranks'
        samples consumed so far): rank-local samples [position / W, position / W + batch_size)."""
        start = position // info.world_size
        if self._at != (info, start) or self._stream is None:
            self._stream = self._open(info, start)  # a seek (resume, or another view of the data)
        out = [next(self._stream) for _ in range(batch_size)]
        self._at = (info, start + batch_size)
        for s in out:
            for key, reason in s.skipped:
                if key not in self.skipped:
                    self.skipped[key] = reason
                    self.log(f"skipping unreadable sample {key} ({reason}); {len(self.skipped)} skipped so far")
        return out

    def batch(self, position: int, batch_size: int, info: DistInfo) -> tuple[torch.Tensor, list[str], list[int]]:
        """Images (B, 3, S, S) in [-1, 1], captions, and their rank-local stream indices."""
        out = self.samples(position, batch_size, info)
        start = position // info.world_size
        return torch.stack([s.image for s in out]), [s.caption for s in out], list(range(start, start + batch_size))
