"""The shapes world as training data: scene i of seed s with its caption, map-style and streaming
datasets, and a writer for the on-disk layouts.

Everything is a pure function of (seed, index): scene i of seed s is drawn from
`np.random.default_rng([s, i, attempt])`, so a training stream can resume at any index. The
judge's held-out prompts are never shown.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from t2i.data.shapes.captioning import captions
from t2i.data.shapes.heldout import heldout_prompts
from t2i.data.shapes.rendering import render, render_array
from t2i.data.shapes.sampling import BACKGROUND_P, sample_scene
from t2i.data.shapes.world import CANVAS, Scene

PRIMARY_P = 0.7  # a dataset item uses the scene's primary (complete) caption this often


@functools.lru_cache(maxsize=1)
def default_exclude() -> frozenset[str]:
    """The judge's held-out prompts, which training data never shows."""
    return frozenset(p for _, p in heldout_prompts())


def shapes_example(seed: int, index: int, exclude: frozenset[str] | set[str] | None = None,
                   max_attempts: int = 100, background_p: float = BACKGROUND_P) -> tuple[Scene, str]:
    """Scene `index` of `seed` and its training caption; a pure function of (seed, index).

    The caption is the scene's primary one with probability PRIMARY_P, else another true
    caption; captions in `exclude` (default: the judge's held-out prompts) are never
    returned (the scene is redrawn if all are). background_p: share of black/gray
    backgrounds (training may weight them up; the world's own share is BACKGROUND_P).
    """
    if exclude is None:
        exclude = default_exclude()
    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, index, attempt])
        scene = sample_scene(rng, background_p=background_p)
        caps = captions(scene, rng)
        if rng.random() >= PRIMARY_P:
            caps = [caps[i] for i in rng.permutation(len(caps))]
        for c in caps:
            if c not in exclude:
                return scene, c
    raise RuntimeError(f"no caption outside the exclude set for scene {index} of seed {seed}")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(Dataset):
    """n fixed scenes of a seed; item i is (image, caption).

    image: (3, size, size) float32 in [-1, 1] when tensor=True, else (size, size, 3) uint8.
    exclude: captions never used (default: the judge's held-out prompts).
    background_p: share of black/gray backgrounds (default: the world's BACKGROUND_P).
    """

    def __init__(self, n: int, seed: int = 0, size: int = CANVAS, exclude: Iterable[str] | None = None,
                 tensor: bool = True, background_p: float = BACKGROUND_P) -> None:
        if not 0.0 <= background_p <= 1.0:
            raise ValueError(f"background_p must be in [0, 1], got {background_p}")
        self.n, self.seed, self.size, self.tensor, self.background_p = n, seed, size, tensor, background_p
        self.exclude = default_exclude() if exclude is None else frozenset(exclude)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        scene, caption = shapes_example(self.seed, i, self.exclude, background_p=self.background_p)
        image = render_array(scene, self.size)
        return (to_tensor(image) if self.tensor else image), caption


class ShapesStream(IterableDataset):
    """The endless shapes world: items seed/start, seed/start+1, ... as (image, caption).

    Resumable: the state is the next index (`state_dict()` / `load_state_dict()`, or pass
    `start`). Under DDP give rank/world_size: rank r takes indices start + r, start + r + W,
    .... With DataLoader workers set worker_chunk to the DataLoader's batch_size: workers
    then take whole batches round-robin, which the DataLoader yields back in order, so
    after k items a rank has consumed exactly its first k indices (`index_after(k)`).
    `state_dict()` tracks the position only with num_workers=0.
    """

    def __init__(self, seed: int = 0, size: int = CANVAS, start: int = 0,
                 exclude: Iterable[str] | None = None, rank: int = 0, world_size: int = 1,
                 tensor: bool = True, worker_chunk: int = 1) -> None:
        self.seed, self.size, self.tensor, self.worker_chunk = seed, size, tensor, worker_chunk
        self.index = start  # next global index this rank's sequence starts from (before rank offset)
        self.rank, self.world_size = rank, world_size
        self.exclude = default_exclude() if exclude is None else frozenset(exclude)

    def index_after(self, k: int) -> int:
        """The stream position after k items of this rank have been consumed."""
        return self.index + k * self.world_size

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.index = int(state["seed"]), int(state["index"])

    def _positions(self) -> Iterator[int]:
        """This process's positions j in the rank's sequence: all of them, or with W
        DataLoader workers, worker w's chunks [w*c, w*c + c), [(w+W)*c, ...) for c = worker_chunk."""
        info = get_worker_info()
        if info is None:
            yield from itertools.count()
            return
        c = self.worker_chunk
        for block in itertools.count(info.id, info.num_workers):
            yield from range(block * c, block * c + c)

    def __iter__(self) -> Iterator:
        start = self.index
        for j in self._positions():
            i = start + self.rank + j * self.world_size
            scene, caption = shapes_example(self.seed, i, self.exclude)
            image = render_array(scene, self.size)
            self.index = start + (j + 1) * self.world_size  # meaningful in the main process only
            yield (to_tensor(image) if self.tensor else image), caption


def write_shapes_dataset(n: int, out_dir: str, seed: int = 0, size: int = CANVAS, layout: str = "folder",
                         exclude: Iterable[str] | None = None) -> list[str]:
    """Writes n scenes as 00000.png ... with their captions; returns the image paths.

    layout 'folder': a 00000.txt caption sidecar per image (the common fine-tuning layout);
    'jsonl': manifest.jsonl lines {"image": "00000.png", "text": caption} (paths relative to
    out_dir); 'both': both. The ground truth of every scene goes to scenes.jsonl.
    """
    if layout not in ("folder", "jsonl", "both"):
        raise ValueError(f"layout must be 'folder', 'jsonl' or 'both', not {layout!r}")
    exclude = default_exclude() if exclude is None else frozenset(exclude)
    os.makedirs(out_dir, exist_ok=True)
    paths, manifest, truth = [], [], []
    for i in range(n):
        scene, caption = shapes_example(seed, i, exclude)
        name = f"{i:05d}.png"
        path = os.path.join(out_dir, name)
        render(scene, size).save(path)
        if layout in ("folder", "both"):
            with open(os.path.join(out_dir, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(caption + "\n")
        manifest.append(json.dumps({"image": name, "text": caption}))
        truth.append(json.dumps({"image": name, "text": caption, **scene.to_dict(size)}))
        paths.append(path)
    if layout in ("jsonl", "both"):
        with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(manifest) + "\n")
    with open(os.path.join(out_dir, "scenes.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(truth) + "\n")
    return paths
