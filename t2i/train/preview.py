"""Distil a preview decoder (`t2i.autoencoders.preview`) from a model's frozen VAE decoder.

One explicit loop: read a batch of images at the run's data position, encode them with the frozen
VAE encoder (a posterior sample, the latents diffusion was trained on), decode them with the frozen
VAE decoder (the target), and step the preview decoder on L1 + MSE to that target on the same
latents. The student never sees the images themselves: it learns the decoder, mistakes included,
so the preview looks like the real decode. Each checkpoint also exports `preview.safetensors`;
grids of a fixed batch show the images, the VAE's decodes and the preview's (top to bottom).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from t2i.autoencoders.kl import AutoencoderKL
from t2i.autoencoders.preview import PreviewDecoder, PreviewDecoderConfig
from t2i.systems.shapes_ldm import DEFAULT_MODEL_FILE, ShapesLDM, is_t2i_model
from t2i.train.autoencoder import load_vae
from t2i.train.checkpoint import restore, resume_run, save_and_prune
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo, broadcast_flag, init_distributed
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
class PreviewTrainConfig:
    """One distillation run. `out` holds checkpoints/, samples/, tb/, log.txt and preview.safetensors.
    The decoder's latent channels, upsamplings and latent scaling are set from the teacher VAE at the
    start of the run; only its width and depth come from here."""

    out: str
    model: str | None = None  # a shapes-LDM model file or a vae.safetensors; None: the built-in model
    decoder: PreviewDecoderConfig = field(default_factory=PreviewDecoderConfig)
    mse_weight: float = 1.0  # loss = L1 + mse_weight * MSE, both against the VAE decoder's output
    data: str = "shapes"
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 2000
    batch_size: int = 16  # per rank
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    image_every: int = 250  # comparison grids; 0: none
    ckpt_every: int = 250
    keep: int = 2
    eval_images: int = 16  # held-out images of the eval L1 logged with every checkpoint

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreviewTrainConfig:
        d = dict(d)
        return cls(decoder=PreviewDecoderConfig(**d.pop("decoder")), **d)


def load_teacher(path: str | Path | None) -> AutoencoderKL:
    """The frozen VAE of a shapes-LDM model file (None: the built-in model) or of a vae.safetensors
    written by `t2i train autoencoder`."""
    file = Path(path) if path is not None else DEFAULT_MODEL_FILE
    return ShapesLDM.load(file).vae if is_t2i_model(file) else load_vae(file)


@torch.no_grad()
def distill_l1(decoder: torch.nn.Module, teacher: AutoencoderKL, x: torch.Tensor) -> float:
    """Mean |preview - VAE decode| on the posterior means of images x (B, 3, H, W), in [-1, 1] units."""
    z = teacher.encode(x).mode()  # (B, C, h, w)
    return (decoder(z) - teacher.decode(z)).abs().mean().item()


def train_preview(cfg: PreviewTrainConfig, resume: bool = False, resume_lr: float | None = None) -> int:
    """Run (or, with resume, continue) a preview decoder distillation. Returns the exit code."""
    info = init_distributed()
    out = Path(cfg.out)
    cfg, ckpt = resume_run(cfg, resume, lr=resume_lr)
    teacher = load_teacher(cfg.model)
    d = cfg.decoder
    cfg.decoder = PreviewDecoderConfig.for_vae(teacher.cfg, d.width, d.blocks, d.final_blocks)
    torch.manual_seed(cfg.seed)
    decoder = PreviewDecoder(cfg.decoder)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    modules, optimizers = {"decoder": decoder}, {"opt": opt}
    step, position = restore(ckpt, modules, optimizers)
    log = RunLog(out, info, step, cfg.steps)
    n_params = sum(p.numel() for p in decoder.parameters())
    log.text(f"preview decoder run {out}: step {step}/{cfg.steps}, {n_params / 1e6:.3f}M parameters, "
             f"f={cfg.decoder.downsample_factor}, teacher {cfg.model or DEFAULT_MODEL_FILE}"
             + (f", resumed from {ckpt}" if ckpt else ""))
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, log.text, cfg.background_p)
    held_out = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed + 1, log.text)
    eval_x, _, _ = held_out.batch(0, cfg.eval_images, DistInfo())  # the same images at every checkpoint
    net = DDP(decoder) if info.enabled else decoder

    def save() -> None:
        if info.is_main:
            save_and_prune(out, cfg, step=step, data_position=position, modules=modules, optimizers=optimizers)
            decoder.save(out / "preview.safetensors")

    t_step = 0.0
    with StopSignal() as stop:
        while step < cfg.steps:
            t0 = time.perf_counter()
            x, _, _ = data.batch(position, cfg.batch_size, info)
            with torch.no_grad():
                z = teacher.encode(x).sample(step_generator(cfg.seed, step, info.rank))  # (B, C, h, w)
                target = teacher.decode(z)  # (B, 3, H, W)
            lr = warmup_lr(step, cfg.lr, cfg.warmup)
            set_lr(opt, lr)
            pred = net(z)
            l1, mse = F.l1_loss(pred, target), F.mse_loss(pred, target)
            loss = l1 + cfg.mse_weight * mse
            check_finite_loss(loss, step, "preview decoder loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
            check_finite_loss(gnorm, step, "preview decoder gradient norm")
            opt.step()
            position += cfg.batch_size * info.world_size
            step += 1
            t_step += time.perf_counter() - t0
            log.advance({"l1": l1.item()})
            if step % cfg.log_every == 0:
                log.scalars(step, {"preview/l1": l1.item(), "preview/mse": mse.item(), "preview/grad_norm":
                                   gnorm.item(), "lr": lr, "time/step_s": t_step / cfg.log_every})
                t_step = 0.0
            if info.is_main and cfg.image_every > 0 and (step % cfg.image_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    z8 = teacher.encode(eval_x[:8]).mode()
                    grid = torch.cat([eval_x[:8], teacher.decode(z8), decoder(z8)])
                save_grid(grid, out / "samples" / f"preview_{step:08d}.png", nrow=8)
            stopping = broadcast_flag(stop.signum is not None, info)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                if info.is_main:
                    held_out_l1 = distill_l1(decoder, teacher, eval_x)
                    log.scalars(step, {"preview/eval_l1": held_out_l1})
                    log.text(f"step {step}: held-out L1 to the VAE decode {held_out_l1:.4f}")
                save()
            if stopping:
                log.text(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                break
    return finish_run(log, stop, step, info)
