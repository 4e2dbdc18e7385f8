"""Train the KL autoencoder (the first stage of latent diffusion) with L1 + KL + patch-GAN.

The step function for `t2i.train.fit`: reconstruct the batch through a sampled posterior, step
the autoencoder on `AutoencoderLoss.generator_loss`, then (once the discriminator has started)
the discriminator on the hinge loss: one step, two optimizers. The grids show a fixed batch
(originals on top, reconstructions below); each checkpoint also exports `vae.safetensors`, the
weights the LDM training reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2i.autoencoders.kl import AutoencoderKL, AutoencoderKLConfig
from t2i.autoencoders.losses import AutoencoderLoss, AutoencoderLossConfig
from t2i.checkpoints.io import save_module
from t2i.checkpoints.limits import load_checked_file
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.fit import Grid, Run, Step, Task, fit


@dataclass
class AETrainConfig(LoopConfig):
    """One autoencoder run. `out` holds checkpoints/, samples/, tb/, log.txt and vae.safetensors."""

    vae: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: str = "shapes"  # shapes | folder | jsonl
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 3000
    lr: float = 2e-4
    grad_clip: float = 1000.0  # the loss is summed over pixels: clip only real spikes
    init_logvar: float | None = -8.0  # initial posterior log-variance (bias of quant_conv); None: default init
    init_from: str | None = None  # start from these autoencoder weights (a vae.safetensors)
    decoder_only: bool = False  # freeze the encoder: improves decoding without moving the latent space


def save_vae(vae: AutoencoderKL, path: str | Path) -> None:
    """The autoencoder's weights with its config in the metadata (atomic)."""
    save_module(vae, path, "autoencoder_kl")


def load_vae(path: str | Path) -> AutoencoderKL:
    """An autoencoder written by `save_vae`, checked before allocating, frozen."""
    return load_checked_file(path, "autoencoder_kl", "an autoencoder file", AutoencoderKLConfig, AutoencoderKL)


def build_autoencoder(cfg: AETrainConfig, run: Run) -> Task:
    vae = AutoencoderKL(cfg.vae)
    if vae.quant_conv is not None and cfg.init_logvar is not None:
        # Start from a nearly deterministic posterior. With the default init its std is ~1, which
        # drowns the weak signals (colour) in the latent for hundreds of steps; the KL term still
        # pulls the posterior towards N(0, I) from here.
        with torch.no_grad():
            vae.quant_conv.bias[cfg.vae.latent_channels:] = cfg.init_logvar
    if cfg.init_from is not None:
        vae.load_state_dict(load_vae(cfg.init_from).state_dict())
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
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    fixed = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed + 1, run.log.text)
    fixed_x, fixed_captions, _ = fixed.batch(0, 8, DistInfo())  # the same 8 images in every grid
    vae_ddp, disc_ddp = run.parallel(vae), run.parallel(loss_fn.discriminator)

    def step(x: torch.Tensor, s: Step) -> dict[str, float]:
        recon, posterior = vae_ddp(x, generator=s.generator)  # (B, 3, H, W)
        loss, logs = loss_fn.generator_loss(x, recon, posterior.kl(), s.index, vae.decoder.conv_out.weight)
        gnorm = s.update(loss, opt_g, trained, "autoencoder loss", average=[loss_fn.logvar])
        if s.index >= cfg.loss.disc_start:
            d_loss, d_logs = loss_fn.discriminator_loss(x, recon, s.index, disc_ddp)
            s.update(d_loss, opt_d, None, "discriminator loss")
            logs.update(d_logs)
        return {**logs, "ae/loss": loss.item(), "ae/grad_norm": gnorm}

    @torch.no_grad()
    def grid() -> Grid:
        rec = vae(fixed_x, sample_posterior=False)[0]
        return Grid(torch.cat([fixed_x, rec]), [*fixed_captions, *["reconstruction"] * len(rec)])

    return Task("autoencoder", {"vae": vae, "loss": loss_fn}, {"opt_g": opt_g, "opt_d": opt_d},
                prepare=lambda position, gen: data.batch(position, cfg.batch_size, run.info)[0], step=step,
                grid=grid, grid_name="recon", export=lambda: save_vae(vae, Path(cfg.out) / "vae.safetensors"))


def train_autoencoder(cfg: AETrainConfig, resume: bool = False, resume_lr: float | None = None,
                      given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) an autoencoder training. Returns the process exit code."""
    return fit(cfg, build_autoencoder, resume=resume, resume_lr=resume_lr, given=given)
