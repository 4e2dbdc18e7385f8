"""The one training loop: `fit(cfg, build)` runs any family's step function.

A family (autoencoder, LDM, preview decoder, CLIP, ...) contributes a config dataclass that
extends `LoopConfig` and a `build(cfg, run) -> Task`: the modules and optimizers to
checkpoint, `prepare(position, generator) -> batch` (the step's data and frozen work, run one
step ahead in a thread) and `step(batch, Step) -> scalars` (its losses and optimizer
updates, through `Step.update`). Everything else is here, once, in the order of DiT's
train.py: DDP (or FSDP, `--parallel fsdp`: `t2i.train.fsdp`) under torchrun, the learning-rate
schedule, EMA, gradient clipping, the NaN/Inf stop naming the step, atomic checksummed checkpoints
with exact `--resume`, SIGINT/SIGTERM save-and-stop, TensorBoard + text log, captioned sample grids
and a progress bar.

Exact resume: a step's randomness comes from `step_generator(seed, step, rank)` and its data
from the data position, both pure functions of the checkpointed (step, position); the global
RNG states are checkpointed too and restored after the family has built its modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from t2i.train import fsdp
from t2i.train.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    sharded_checkpoint_path,
)
from t2i.train.config import C, LoopConfig, resolve_config
from t2i.train.distributed import DistInfo, broadcast_flag, init_distributed
from t2i.train.ema import EMA
from t2i.train.loop import (
    RunLog,
    StopSignal,
    check_finite_loss,
    finish_run,
    save_grid,
    set_lr,
    step_generator,
    warmup_lr,
)


@dataclass
class Grid:
    """A sample grid: images (N, 3, H, W) in [-1, 1], a caption under each, `nrow` per row."""

    images: torch.Tensor
    captions: list[str]
    nrow: int = 8


@dataclass
class Step:
    """One optimizer step as a family's step function sees it."""

    index: int  # steps done before this one
    generator: torch.Generator  # this step's randomness (already advanced by `prepare`)
    grad_clip: float
    info: DistInfo

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: Iterable[torch.Tensor] | None,
               name: str = "loss", average: Iterable[torch.Tensor] = ()) -> float | None:
        """Backward `loss` and step `optimizer`. Stops the run (NonFiniteLossError naming the step)
        before a NaN/Inf loss or gradient touches the weights. clip: the parameters whose gradient
        norm is clipped to grad_clip (None: no clipping). average: parameters outside every DDP module
        whose gradients must still be averaged over the ranks. Returns the gradient norm (before
        clipping) or None."""
        check_finite_loss(loss, self.index, name)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in average:
            if self.info.enabled and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.info.world_size
        gnorm = None
        if clip is not None:
            norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(clip, self.grad_clip))
            check_finite_loss(norm, self.index, f"{name} gradient norm")
            gnorm = norm.item()
        optimizer.step()
        return gnorm


@dataclass
class Task:
    """A family's part of a run, made by its `build(cfg, run)`."""

    name: str  # "ldm", "autoencoder", ...: the run's first log line
    modules: dict[str, nn.Module]  # checkpointed under these names (an EMA copy included)
    optimizers: dict[str, torch.optim.Optimizer]  # every one follows the learning-rate schedule
    prepare: Callable[[int, torch.Generator], Any]  # (data position, step generator) -> batch; no autograd
    step: Callable[[Any, Step], dict[str, float]]  # one optimizer step -> scalars to log (first: the bar's)
    ema: EMA | None = None  # updated after every step
    lr: Callable[[int], float] | None = None  # step -> learning rate (None: linear warm-up, then constant)
    grid: Callable[[], Grid] | None = None  # the periodic sample grid
    grid_name: str = "samples"  # samples/<grid_name>_<step>.png
    export: Callable[[], None] | None = None  # write the shipped file(s) (rank 0)
    evaluate: Callable[[int], None] | None = None  # held-out measurement at a step (rank 0)
    about: str = ""  # appended to the run's first log line


@dataclass
class Run:
    """What a family's build gets from `fit` besides its config."""

    info: DistInfo
    log: RunLog
    mode: str = "ddp"  # "fsdp": `parallel` shards
    sharded: fsdp.ParamMap = field(default_factory=dict)  # original parameter id -> its FSDP replacement

    def parallel(self, module: nn.Module) -> nn.Module:
        """The module to call in the step: DDP-wrapped (gradients averaged over ranks) under torchrun,
        or with mode "fsdp" sharded in place (`t2i.train.fsdp.shard_module`) and returned."""
        if self.mode == "fsdp":
            return fsdp.shard_module(module, self.info, self.sharded)
        return DDP(module) if self.info.enabled else module


def exports_at(cfg: LoopConfig, step: int) -> bool:
    """Whether the shipped file(s) are written at `step` (besides where the run ends): every
    `export_every` steps, with every checkpoint when it is 0, never before the end when it is -1 (a
    full fine-tune's model is as big as the U-Net, 3.4 GB for SD 1.5, and its checkpoints hold it)."""
    if cfg.export_every < 0:
        return False
    return step % (cfg.export_every or cfg.ckpt_every) == 0


def fit(cfg: C, build: Callable[[C, Run], Task], *, resume: bool = False, resume_lr: float | None = None,
        given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a training. Returns the exit code: 0, or 128 + the signal
    number after a stop by SIGINT/SIGTERM. `given`: see `resolve_config`."""
    info = init_distributed()
    notes: list[str] = []
    cfg, ckpt = resolve_config(cfg, resume, resume_lr, given, notes.append, info.is_main)
    if cfg.data_workers < 0:
        raise ValueError(f"--data-workers must be >= 0, got {cfg.data_workers}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel must be ddp or fsdp, not {cfg.parallel!r}")
    sharded = cfg.parallel == "fsdp"
    if sharded:
        info = init_distributed(group=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    log = RunLog(out, info, 0, cfg.steps)
    for note in notes:
        log.text(note)
    torch.manual_seed(cfg.seed)
    run = Run(info, log, cfg.parallel)
    task = build(cfg, run)
    if sharded and task.name not in fsdp.FAMILIES:
        raise ValueError(f"--parallel fsdp: not for the {task.name} family yet (families: {', '.join(fsdp.FAMILIES)})")
    if sharded:
        fsdp.rebind_optimizers(task.optimizers, run.sharded)
        if task.ema is not None:
            fsdp.shard_module(task.ema.averaged, info)  # its update stays a lerp of local shards
        log.text("FSDP: sample grids, exports and evaluations are made from a checkpoint after the run: "
                 "t2i convert RUN/checkpoints/step_N.dcp OUT")
    # After the build (whose random init it overwrites), before anything draws: restores the RNGs too.
    step, position = 0, 0
    if ckpt is not None:
        if sharded:
            meta = fsdp.load_sharded(ckpt, modules=task.modules, optimizers=task.optimizers, info=info)
        else:
            meta = load_checkpoint(ckpt, modules=task.modules, optimizers=task.optimizers)
        step, position = meta["step"], meta["data_position"]
    log.resumed_at(step)
    log.text(f"{task.name} run {out}: step {step}/{cfg.steps}{task.about}"
             + (f", resumed from {ckpt}" if ckpt else ""))
    stride = cfg.batch_size * info.world_size
    lr_at = task.lr or (lambda s: warmup_lr(s, cfg.lr, cfg.warmup))

    def prepared(step: int, position: int) -> tuple[Any, torch.Generator]:
        gen = step_generator(cfg.seed, step, info.rank)
        with torch.no_grad():
            return task.prepare(position, gen), gen

    def save() -> None:
        if sharded:  # collective: every rank writes its shards
            fsdp.save_sharded(sharded_checkpoint_path(out, step), step=step, data_position=position,
                              config=cfg.to_dict(), family=task.name, modules=task.modules,
                              optimizers=task.optimizers, info=info)
        else:
            save_checkpoint(checkpoint_path(out, step), step=step, data_position=position, config=cfg.to_dict(),
                            modules=task.modules, optimizers=task.optimizers)
        if info.is_main:
            prune_checkpoints(out, cfg.keep)

    # The next step's batch is prepared in a thread while this step trains (torch and numpy release the
    # GIL), so even with --threads 1 a second core is used. Its numbers are the same as in line.
    prefetch = ThreadPoolExecutor(1)
    t_data = t_step = 0.0
    try:
        with StopSignal() as stop:
            pending = prefetch.submit(prepared, step, position) if step < cfg.steps else None
            while step < cfg.steps:
                t0 = time.perf_counter()
                batch, gen = pending.result()  # type: ignore[union-attr]
                if step + 1 < cfg.steps:
                    pending = prefetch.submit(prepared, step + 1, position + stride)
                t1 = time.perf_counter()
                lr = lr_at(step)
                for opt in task.optimizers.values():
                    set_lr(opt, lr)
                logs = task.step(batch, Step(step, gen, cfg.grad_clip, info))
                if task.ema is not None:
                    task.ema.update(step)
                position += stride
                step += 1
                t_data, t_step = t_data + t1 - t0, t_step + time.perf_counter() - t1
                log.advance(dict(list(logs.items())[:1]))
                if step % cfg.log_every == 0:
                    log.scalars(step, {**logs, "lr": lr, "time/data_s": t_data / cfg.log_every,
                                       "time/step_s": t_step / cfg.log_every})
                    t_data = t_step = 0.0
                stopping = broadcast_flag(stop.signum is not None, info)
                end = step == cfg.steps or stopping
                if sharded and (step % cfg.ckpt_every == 0 or end):
                    save()
                elif info.is_main and not sharded:
                    if task.grid is not None and cfg.image_every > 0 and (step % cfg.image_every == 0 or end):
                        grid = task.grid()
                        save_grid(grid.images, out / "samples" / f"{task.grid_name}_{step:08d}.png", grid.nrow,
                                  grid.captions)
                    if task.evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or end):
                        task.evaluate(step)
                    if step % cfg.ckpt_every == 0 or end:
                        save()
                    if task.export is not None and (exports_at(cfg, step) or end):
                        task.export()
                if stopping:
                    log.text(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                    break
    finally:
        prefetch.shutdown(cancel_futures=True)
    return finish_run(log, stop, step, info)
