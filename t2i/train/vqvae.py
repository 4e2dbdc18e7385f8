"""Train a VQ-VAE image tokenizer (van den Oord et al. 2017) with the one training loop.

The step function for `t2i.train.fit`: reconstruct the batch through the quantizer, step the
encoder and decoder on MSE reconstruction + the commitment loss (eq. 3; the codebook term is
replaced by the quantizer's EMA update, which runs inside the forward pass), and log codebook
usage: the batch's code perplexity and the dead codes restarted at this step. The grids show a
fixed batch (originals on top, reconstructions below); each checkpoint also exports
`vqvae.safetensors`, the tokenizer the token models read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.io import save_module
from t2i.checkpoints.limits import load_checked_file
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.fit import Grid, Run, Step, Task, fit


@dataclass
class VQTrainConfig(LoopConfig):
    """One VQ-VAE run. `out` holds checkpoints/, samples/, tb/, log.txt and vqvae.safetensors."""

    vq: VQAutoencoderConfig = field(default_factory=lambda: dataclasses.replace(VQ_CONFIGS["f4"]))
    data: str = "shapes"  # shapes | folder | jsonl
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-4  # Adam, as in the paper
    grad_clip: float = 10.0


def save_vqvae(model: VQAutoencoder, path: str | Path) -> None:
    """The tokenizer's weights and codebook (with its EMA statistics) and its config in the metadata."""
    save_module(model, path, "vq_autoencoder")


def load_vqvae(path: str | Path) -> VQAutoencoder:
    """A tokenizer written by `save_vqvae`, checked before allocating, frozen."""
    return load_checked_file(path, "vq_autoencoder", "a VQ autoencoder file", VQAutoencoderConfig, VQAutoencoder)


def vq_loss(model: torch.nn.Module, x: torch.Tensor,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE reconstruction + commitment (eq. 3 without the codebook term) of x (B, 3, H, W), and
    the scalars to log. In training mode the quantizer's codebook takes its EMA step."""
    recon, q = model(x, generator)  # (B, 3, H, W)
    rec = F.mse_loss(recon, x)
    loss = rec + q.commitment
    return loss, {"vq/rec_mse": rec.item(), "vq/commitment": q.commitment.item(),
                  "vq/perplexity": q.perplexity.item(), "vq/dead_codes": float(q.dead_codes)}


def build_vqvae(cfg: VQTrainConfig, run: Run) -> Task:
    model = VQAutoencoder(cfg.vq)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    fixed = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed + 1, run.log.text)
    fixed_x, fixed_captions, _ = fixed.batch(0, 8, DistInfo())  # the same 8 images in every grid
    model_ddp = run.parallel(model)

    def step(x: torch.Tensor, s: Step) -> dict[str, float]:
        loss, logs = vq_loss(model_ddp, x, s.generator)
        gnorm = s.update(loss, opt, model.parameters(), "VQ-VAE loss")
        return {"vq/loss": loss.item(), **logs, "vq/grad_norm": gnorm}

    @torch.no_grad()
    def grid() -> Grid:
        rec = model.decode_codes(model.encode(fixed_x)[0])
        return Grid(torch.cat([fixed_x, rec]), [*fixed_captions, *["reconstruction"] * len(rec)])

    k, f = cfg.vq.num_codes, cfg.vq.downsample_factor
    return Task("vqvae", {"vq": model}, {"opt": opt}, prepare=lambda position, gen: data.batch(
                    position, cfg.batch_size, run.info)[0], step=step, grid=grid, grid_name="recon",
                export=lambda: save_vqvae(model, Path(cfg.out) / "vqvae.safetensors"),
                about=f", {k} codes, f={f}")


def train_vqvae(cfg: VQTrainConfig, resume: bool = False, resume_lr: float | None = None,
                given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a VQ-VAE training. Returns the process exit code."""
    return fit(cfg, build_vqvae, resume=resume, resume_lr=resume_lr, given=given)
