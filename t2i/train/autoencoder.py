"""Train the KL autoencoder (the first stage of latent diffusion) with L1 + KL + patch-GAN.

One explicit loop: read a batch at the run's data position, reconstruct through a sampled
posterior, step the autoencoder on `AutoencoderLoss.generator_loss`, then (once the
discriminator has started) the discriminator on the hinge loss. Reconstructions of a fixed
batch are written as PNG grids (originals on top, reconstructions below); each checkpoint
also exports `vae.safetensors`, the weights the LDM training reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from t2i.autoencoders.kl import AutoencoderKL, AutoencoderKLConfig
from t2i.autoencoders.losses import AutoencoderLoss, AutoencoderLossConfig
from t2i.checkpoints.io import load_state_dict, read_config, save_with_config
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
class AETrainConfig:
    """One autoencoder run. `out` holds checkpoints/, samples/, tb/, log.txt and vae.safetensors."""

    out: str
    vae: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: str = "shapes"  # shapes | folder | jsonl
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 3000
    batch_size: int = 16  # per rank
    lr: float = 2e-4
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    image_every: int = 250  # reconstruction grids; 0: none
    ckpt_every: int = 250
    keep: int = 2
    init_logvar: float | None = -8.0  # initial posterior log-variance (bias of quant_conv); None: default init
    init_from: str | None = None  # start from these autoencoder weights (a vae.safetensors)
    decoder_only: bool = False  # freeze the encoder: improves decoding without moving the latent space

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AETrainConfig:
        d = dict(d)
        return cls(vae=AutoencoderKLConfig(**d.pop("vae")), loss=AutoencoderLossConfig(**d.pop("loss")), **d)


def save_vae(vae: AutoencoderKL, path: str | Path) -> None:
    """The autoencoder's weights with its config in the metadata (atomic)."""
    state = {k: v.detach().float() for k, v in vae.state_dict().items()}
    save_with_config(state, path, dataclasses.asdict(vae.cfg), "autoencoder_kl")


def load_vae(path: str | Path) -> AutoencoderKL:
    """An autoencoder written by `save_vae`, frozen."""
    vae = AutoencoderKL(AutoencoderKLConfig(**read_config(path, "an autoencoder file", "autoencoder_kl")))
    vae.load_state_dict(load_state_dict(path))
    return vae.eval().requires_grad_(False)


def _average_grad(param: torch.Tensor, info: DistInfo) -> None:
    """All-reduce a parameter that lives outside the DDP-wrapped modules (the loss's logvar)."""
    if info.enabled and param.grad is not None:
        dist.all_reduce(param.grad)
        param.grad /= info.world_size


def train_autoencoder(cfg: AETrainConfig, resume: bool = False, resume_lr: float | None = None) -> int:
    """Run (or, with resume, continue) an autoencoder training. Returns the process exit code."""
    info = init_distributed()
    out = Path(cfg.out)
    cfg, ckpt = resume_run(cfg, resume, lr=resume_lr)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(cfg.vae)
    if vae.quant_conv is not None and cfg.init_logvar is not None:
        # Start from a nearly deterministic posterior. With the default init its std is ~1, which
        # drowns the weak signals (colour) in the latent for hundreds of steps; the KL term still
        # pulls the posterior towards N(0, I) from here.
        with torch.no_grad():
            vae.quant_conv.bias[cfg.vae.latent_channels:] = cfg.init_logvar
    if cfg.init_from is not None:
        vae.load_state_dict(load_vae(cfg.init_from).state_dict())
    trained = [*vae.parameters()]
    if cfg.decoder_only:
        # An LDM trained on this encoder's latents stays valid (SD's "ft-MSE" decoder fine-tuning).
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
        trained = [p for p in vae.parameters() if p.requires_grad]
    loss_fn = AutoencoderLoss(cfg.loss, cfg.vae.in_channels)
    betas = (0.5, 0.9)  # the GAN setting of LDM's first stage
    opt_g = torch.optim.AdamW([*trained, loss_fn.logvar], lr=cfg.lr, betas=betas, weight_decay=0.0)
    opt_d = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=cfg.lr, betas=betas, weight_decay=0.0)
    modules = {"vae": vae, "loss": loss_fn}
    optimizers = {"opt_g": opt_g, "opt_d": opt_d}
    step, position = restore(ckpt, modules, optimizers)
    log = RunLog(out, info, step, cfg.steps)
    log.text(f"autoencoder run {out}: step {step}/{cfg.steps}" + (f", resumed from {ckpt}" if ckpt else ""))
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, log.text, cfg.background_p)
    fixed = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed + 1, log.text)
    fixed_x, _, _ = fixed.batch(0, 8, DistInfo())  # the same 8 images in every reconstruction grid
    vae_ddp = DDP(vae) if info.enabled else vae
    disc_ddp = DDP(loss_fn.discriminator) if info.enabled else loss_fn.discriminator
    last_layer = vae.decoder.conv_out.weight

    def save() -> None:
        if info.is_main:
            save_and_prune(out, cfg, step=step, data_position=position, modules=modules, optimizers=optimizers)
            save_vae(vae, out / "vae.safetensors")

    with StopSignal() as stop:
        while step < cfg.steps:
            x, _, _ = data.batch(position, cfg.batch_size, info)
            gen = step_generator(cfg.seed, step, info.rank)
            lr = warmup_lr(step, cfg.lr, cfg.warmup)
            set_lr(opt_g, lr)
            set_lr(opt_d, lr)
            recon, posterior = vae_ddp(x, generator=gen)  # (B, 3, H, W)
            loss, logs = loss_fn.generator_loss(x, recon, posterior.kl(), step, last_layer)
            check_finite_loss(loss, step, "autoencoder loss")
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            _average_grad(loss_fn.logvar, info)
            gnorm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            check_finite_loss(gnorm, step, "autoencoder gradient norm")
            opt_g.step()
            if step >= cfg.loss.disc_start:
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon, step, disc_ddp)
                check_finite_loss(d_loss, step, "discriminator loss")
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                logs.update(d_logs)
            position += cfg.batch_size * info.world_size
            step += 1
            logs.update({"ae/loss": loss.item(), "lr": lr, "ae/grad_norm": gnorm.item()})
            log.advance({"l1": logs["ae/l1"]})
            if step % cfg.log_every == 0:
                log.scalars(step, logs)
            if info.is_main and cfg.image_every > 0 and (step % cfg.image_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    rec = vae(fixed_x, sample_posterior=False)[0]
                save_grid(torch.cat([fixed_x, rec]), out / "samples" / f"recon_{step:08d}.png", nrow=8)
            stopping = broadcast_flag(stop.signum is not None, info)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                save()
            if stopping:
                log.text(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                break
    return finish_run(log, stop, step, info)
