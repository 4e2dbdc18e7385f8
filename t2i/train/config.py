"""A training run's config: the fields `t2i.train.fit` reads (`LoopConfig`, which every family's
config extends) and how a resumed run's config is resolved from its checkpoint and the options the
user gave explicitly."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from t2i.train.checkpoint import latest_intact_checkpoint, read_metadata


@dataclass
class LoopConfig:
    """What `fit` reads of a run's config. Each family's config extends it (overriding defaults
    where its own differ), so a checkpoint holds one flat, self-describing dict."""

    out: str  # run directory: checkpoints/, samples/, tb/, log.txt and the family's exported files
    steps: int = 1000  # total optimizer steps of the run
    batch_size: int = 16  # per process
    lr: float = 1e-3  # peak learning rate
    warmup: int = 100  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # max gradient norm
    seed: int = 0  # initial weights, data order and every step's noise
    threads: int | None = None  # torch intra-op threads (None: torch's choice)
    log_every: int = 25  # scalars to log.txt / TensorBoard
    image_every: int = 250  # sample grids; 0: none
    ckpt_every: int = 250
    export_every: int = 0  # the family's shipped file(s); 0: with every checkpoint; -1: only where the run ends
    eval_every: int = 0  # the family's held-out evaluation, if it has one; 0: only at the end
    keep: int = 2  # checkpoints kept
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (sharded; t2i.train.fsdp)
    data_workers: int = 0  # DataLoader processes reading WebDataset shards (part of the data order)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Inverse of to_dict: nested dataclass fields are rebuilt (with their own from_dict when they
        have one); keys this version does not know are dropped, missing ones take their defaults."""
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, kind = d[f.name], hints[f.name]
            if dataclasses.is_dataclass(kind) and isinstance(value, dict):
                value = kind.from_dict(value) if hasattr(kind, "from_dict") else kind(**value)
            kw[f.name] = value
        return cls(**kw)


C = TypeVar("C", bound=LoopConfig)

# What a resumed run may change: how long it runs and how often it logs, samples, saves and evaluates.
# Everything else decides what is trained on what, which the checkpoint has already fixed.
RESUMABLE = frozenset({"steps", "threads", "log_every", "image_every", "ckpt_every", "export_every",
                       "eval_every", "keep", "sample_steps"})


def get_path(obj: Any, path: str) -> Any:
    """obj.a.b for path "a.b"."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def set_path(obj: Any, path: str, value: Any) -> None:
    *head, last = path.split(".")
    setattr(get_path(obj, ".".join(head)) if head else obj, last, value)


def _plain(value: Any) -> Any:
    """A config value as its checkpoint stores it (tuples become lists), for comparing the two."""
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def resolve_config(cfg: C, resume: bool, resume_lr: float | None = None, given: dict[str, str] | None = None,
                   warn: Callable[[str], None] = print, is_main: bool = True) -> tuple[C, Path | None]:
    """The config to run with and the checkpoint to continue from (None: a fresh run).

    With `resume`: the newest intact checkpoint under `cfg.out` (corrupt newer ones are named through
    `warn` and passed over; FileNotFoundError if there is none, rather than silently starting over) and
    the run's own saved config. `given` maps each option the user set explicitly (config path -> flag):
    of those, the RESUMABLE ones replace the saved values and any other must equal its saved value
    (ValueError otherwise); None (a call from Python) takes every RESUMABLE value from `cfg`.
    `resume_lr` replaces the learning rate from here on (lowering it late in a long run is the point).
    Only the main process (`is_main`) moves a corrupt checkpoint aside.
    """
    if resume_lr is not None and not (resume_lr > 0 and math.isfinite(resume_lr)):
        raise ValueError(f"--resume-lr must be a positive learning rate, got {resume_lr}")
    if not resume:
        if resume_lr is not None:
            raise ValueError("--resume-lr only applies with --resume (a new run takes --lr)")
        return cfg, None
    ckpt = latest_intact_checkpoint(cfg.out, warn, move_aside=is_main)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no intact checkpoint under {Path(cfg.out) / 'checkpoints'}")
    saved = type(cfg).from_dict(read_metadata(ckpt)["config"])
    saved.out = cfg.out  # where the checkpoint was found: a run copied elsewhere continues there
    explicit = {name: f"--{name.replace('_', '-')}" for name in RESUMABLE} if given is None else given
    for path, flag in sorted(explicit.items()):
        if path in RESUMABLE:
            if hasattr(saved, path):
                setattr(saved, path, getattr(cfg, path))
        elif _plain(get_path(cfg, path)) != _plain(get_path(saved, path)):
            raise ValueError(f"{flag} {_plain(get_path(cfg, path))} differs from the run's saved "
                             f"{_plain(get_path(saved, path))}: a resumed run trains the same model on the same "
                             "data (start a new --out to change it; --resume-lr changes the learning rate)")
    if resume_lr is not None:
        saved.lr = resume_lr
    return saved, ckpt
