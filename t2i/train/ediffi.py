"""eDiff-I's binary-tree fine-tuning of expert denoisers (Balaji et al. 2022, sec. 4.1).

Start from one model trained over all noise levels (the base, a shapes-LDM file). Split its timestep
range [0, T) in two and fine-tune a copy of the base on each half; with depth 2, split each half again
and fine-tune each quarter from its half's expert. The leaves are the experts
(`t2i.systems.ediffi` samples them, switching by sigma). Depth 0 is the control of the ablation: one
copy fine-tuned on all of [0, T) with the same recipe.

Every node is one ordinary latent-diffusion run (`t2i.train.ldm`, its `timestep_range` and
`init_from`): the one training loop, its checkpoints and exact resume. The tree only orders the runs
and hands each the right starting file. The out folder holds:

    tree.json                the tree's config (what --resume continues)
    runs/t0000-0500/ ...     one LDM run per node (checkpoints/, log.txt, samples/, model.safetensors)
    model/                   the model (`t2i generate --model OUT/model`), written when every leaf is done:
                             expert_t0000-0500.safetensors ... and ediffi.json

The model folder holds nothing else, so that it can be copied or installed alone and its size on disk
is its weights (what `precision="auto"` reads; the runs' checkpoints are many times larger).

A run stopped anywhere continues, with --resume, at the node it was on, from that node's newest
checkpoint; finished nodes are not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i.systems.ediffi import expert_file_name, write_manifest
from t2i.systems.shapes_ldm import ShapesLDM
from t2i.train.checkpoint import latest_intact_checkpoint, read_metadata
from t2i.train.config import RESUMABLE, get_path
from t2i.train.ldm import LDMTrainConfig, train_ldm

TREE_FILE = "tree.json"
MODEL_DIR = "model"  # the experts folder inside the run directory
# The node's own settings, decided by the tree and the base model, never by the user. Node k runs with seed
# `seed + k`: its own stream of the (endless) shapes world, so that a child does not see its parent's images
# again and the tree, like the one model it is compared with, trains on distinct images throughout.
NODE_FIELDS = ("out", "steps", "seed", "init_from", "vae_path", "timestep_range", "image_size", "prediction_type",
               "model")


@dataclass
class EDiffITrainConfig(LDMTrainConfig):
    """A tree of expert fine-tunings. The LDMTrainConfig fields are every node's recipe (batch size,
    learning rate, EMA, data ...); NODE_FIELDS among them are set per node."""

    base: str = ""  # the shapes-LDM file trained over all noise levels
    depth: int = 1  # 0: one model (the control), 1: two experts, 2: four
    steps_per_expert: int = 500  # optimizer steps of every node (depth 2 trains 2 + 4 nodes)


def tree_levels(depth: int, total: int) -> list[list[tuple[int, int]]]:
    """The timestep intervals [lo, hi) of each level below the root: level k halves level k - 1's
    intervals at their midpoints. depth 0: [[(0, total)]], the root itself fine-tuned."""
    if not 0 <= depth <= 3:
        raise ValueError(f"--depth must be 0, 1, 2 or 3, got {depth}")
    levels = [[(0, total)]]
    for _ in range(depth):
        levels.append([half for lo, hi in levels[-1] for half in ((lo, (lo + hi) // 2), ((lo + hi) // 2, hi))])
    return levels[1:] if depth else levels


def node_name(interval: tuple[int, int]) -> str:
    return f"t{interval[0]:04d}-{interval[1]:04d}"


def nodes(depth: int, total: int) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
    """(interval, parent interval or None for the base) of every node, in training order (level by level)."""
    out: list[tuple[tuple[int, int], tuple[int, int] | None]] = []
    levels = tree_levels(depth, total)
    for k, level in enumerate(levels):
        for iv in level:
            parent = None if k == 0 else next(p for p in levels[k - 1] if p[0] <= iv[0] and iv[1] <= p[1])
            out.append((iv, parent))
    return out


def node_done(run: Path, steps: int) -> bool:
    """A node's run reached its last step (its newest intact checkpoint says so) and exported its model."""
    ckpt = latest_intact_checkpoint(run, warn=lambda _m: None, move_aside=False)
    return (ckpt is not None and read_metadata(ckpt)["step"] >= steps
            and (run / "model.safetensors").is_file())


def _plain(value: object) -> object:
    return json.loads(json.dumps(value))


def tree_config(cfg: EDiffITrainConfig, resume: bool, given: dict[str, str] | None) -> EDiffITrainConfig:
    """The tree's config: `cfg` for a new tree (written to tree.json); with resume the saved one, where
    only the RESUMABLE options given again change and any other given must equal its saved value."""
    path = Path(cfg.out) / TREE_FILE
    if not resume:
        if path.exists():
            raise ValueError(f"{cfg.out} already holds an expert tree: continue it with --resume or choose another "
                             "--out")
        if not cfg.base or not Path(cfg.base).is_file():
            raise ValueError(f"--base {cfg.base!r}: give the shapes-LDM file the experts are fine-tuned from")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        return cfg
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {TREE_FILE} under {cfg.out}")
    saved = EDiffITrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    saved.out = cfg.out
    for key, flag in sorted((given or {}).items()):
        if key in RESUMABLE:
            setattr(saved, key, getattr(cfg, key))
        elif _plain(get_path(cfg, key)) != _plain(get_path(saved, key)):
            raise ValueError(f"{flag} {get_path(cfg, key)} differs from the tree's saved {get_path(saved, key)}: a "
                             "resumed tree trains the same experts (start a new --out to change it)")
    path.write_text(json.dumps(saved.to_dict(), indent=2) + "\n", encoding="utf-8")  # what the nodes now run with
    return saved


def train_ediffi(cfg: EDiffITrainConfig, resume: bool = False, resume_lr: float | None = None,
                 given: dict[str, str] | None = None, text_encoder: torch.nn.Module | None = None) -> int:
    """Train (or, with resume, continue) the tree; returns the exit code (a stopped node's: 128 + signal).

    text_encoder: as `train_ldm`'s (default: the base model's MiniLM)."""
    if resume_lr is not None:
        raise ValueError("--resume-lr: a tree's nodes share one learning-rate schedule; give --lr to a new tree")
    cfg = tree_config(cfg, resume, given)
    base = ShapesLDM.load(cfg.base)
    schedule = base.cfg.schedule
    total = schedule.num_train_timesteps
    out = Path(cfg.out)
    recipe = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LDMTrainConfig) if f.name not in NODE_FIELDS}
    plan = nodes(cfg.depth, total)
    for k, (interval, parent) in enumerate(plan):
        run = out / "runs" / node_name(interval)
        if node_done(run, cfg.steps_per_expert):
            continue
        start = cfg.base if parent is None else str(out / "runs" / node_name(parent) / "model.safetensors")
        node = LDMTrainConfig(**recipe, out=str(run), steps=cfg.steps_per_expert, seed=cfg.seed + k, init_from=start,
                              timestep_range=None if interval == (0, total) else interval,
                              image_size=base.cfg.image_size, prediction_type=schedule.prediction_type)
        again = latest_intact_checkpoint(run, warn=lambda _m: None, move_aside=False) is not None
        # given=None: a node stopped midway takes every resumable option (threads, ckpt_every...) from `node`,
        # i.e. the tree's as resumed now, not the values its own checkpoint saved
        code = train_ldm(node, resume=again, text_encoder=text_encoder)
        if code != 0 or not node_done(run, cfg.steps_per_expert):
            return code or 1
    leaves = [iv for iv, _ in plan if all(p != iv for _, p in plan)]
    model = out / MODEL_DIR
    model.mkdir(exist_ok=True)
    for iv in leaves:
        target = model / expert_file_name(iv)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(out / "runs" / node_name(iv) / "model.safetensors", tmp)
        os.replace(tmp, target)
    write_manifest(model, leaves, schedule.alphas_cumprod(), base=cfg.base, depth=cfg.depth,
                   steps_per_expert=cfg.steps_per_expert, nodes=len(plan))
    return 0
