"""Distil a TAESD (`t2i.autoencoders.preview`: decoder and encoder) from a model's frozen VAE.

The step function for `t2i.train.fit`: a batch of images is encoded with the frozen VAE encoder
(a posterior sample, the latents diffusion was trained on) and decoded with the frozen VAE decoder
(the target), and the TAESD decoder steps on L1 + MSE to that target on the same latents. The
student never sees the images themselves: it learns the decoder, mistakes included, so the
preview looks like the real decode. The TAESD encoder steps on the MSE to the VAE's posterior mean
(in TAESD's latent space, the diffusion latents), as TAESD's own encoder was distilled; it makes
the export a whole `AutoencoderTiny`. Each checkpoint also exports `preview.safetensors` and the
diffusers folder `taesd/`; grids of a fixed batch show the images, the VAE's decodes and the
preview's (top to bottom).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.autoencoders.kl import AutoencoderKL
from t2i.autoencoders.preview import PreviewDecoder, PreviewDecoderConfig
from t2i.systems.shapes_ldm import DEFAULT_MODEL_FILE, ShapesLDM, is_t2i_model
from t2i.train.autoencoder import load_vae
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.fit import Grid, Run, Step, Task, fit


@dataclass
class PreviewTrainConfig(LoopConfig):
    """One distillation run. `out` holds checkpoints/, samples/, tb/, log.txt and preview.safetensors.
    The decoder's latent channels, upsamplings and latent scaling are set from the teacher VAE at the
    start of the run; only its width and depth come from here."""

    model: str | None = None  # a shapes-LDM model file or a vae.safetensors; None: the built-in model
    decoder: PreviewDecoderConfig = field(default_factory=PreviewDecoderConfig)
    mse_weight: float = 1.0  # loss = L1 + mse_weight * MSE, both against the VAE decoder's output
    encoder_weight: float = 1.0  # + encoder_weight * MSE of the TAESD encoder to the VAE's diffusion latents
    data: str = "shapes"
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 2000
    eval_every: int = 250  # held-out L1 to the VAE decode
    eval_images: int = 16  # held-out images of that L1


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


@torch.no_grad()
def encoder_mse(model: PreviewDecoder, teacher: AutoencoderKL, x: torch.Tensor) -> float:
    """Mean squared error of the TAESD encoder on images x (B, 3, H, W) to the VAE's posterior means,
    in TAESD's latent space (the diffusion latents, about unit variance)."""
    return F.mse_loss(model.encoder(x), model.to_taesd_latents(teacher.encode(x).mode())).item()


def build_preview(cfg: PreviewTrainConfig, run: Run) -> Task:
    teacher = load_teacher(cfg.model)
    d = cfg.decoder
    cfg.decoder = PreviewDecoderConfig.for_vae(teacher.cfg, d.width, d.blocks, d.final_blocks)
    torch.manual_seed(cfg.seed)  # again: the decoder's init must not depend on what loading the teacher drew
    decoder = PreviewDecoder(cfg.decoder)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    held_out = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed + 1, run.log.text)
    eval_x, eval_captions, _ = held_out.batch(0, cfg.eval_images, DistInfo())  # the same images every time
    # two wrappers: under DDP every parameter of a wrapped module must take part in its forward
    dec_net, enc_net = run.parallel(decoder.decoder), run.parallel(decoder.encoder)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        x, _, _ = data.batch(position, cfg.batch_size, run.info)
        posterior = teacher.encode(x)
        z = posterior.sample(gen)  # (B, C, h, w)
        # TAESD's latent space: u = (z - shift) * scale, the diffusion latents
        return x, decoder.to_taesd_latents(posterior.mode()), decoder.to_taesd_latents(z), teacher.decode(z)

    def step(batch: tuple[torch.Tensor, ...], s: Step) -> dict[str, float]:
        x, u_mean, u, target = batch
        pred = dec_net(u)  # (B, 3, H, W)
        l1, mse = F.l1_loss(pred, target), F.mse_loss(pred, target)
        enc_mse = F.mse_loss(enc_net(x), u_mean)
        loss = l1 + cfg.mse_weight * mse + cfg.encoder_weight * enc_mse
        gnorm = s.update(loss, opt, decoder.parameters(), "preview decoder loss")
        return {"preview/l1": l1.item(), "preview/mse": mse.item(), "preview/encoder_mse": enc_mse.item(),
                "preview/grad_norm": gnorm}

    @torch.no_grad()
    def grid() -> Grid:
        z8 = teacher.encode(eval_x[:8]).mode()
        n = len(z8)
        return Grid(torch.cat([eval_x[:8], teacher.decode(z8), decoder(z8)]),
                    [*eval_captions[:8], *["VAE decode"] * n, *["preview decode"] * n])

    def evaluate(step: int) -> None:
        held_out_l1, held_out_enc = distill_l1(decoder, teacher, eval_x), encoder_mse(decoder, teacher, eval_x)
        run.log.scalars(step, {"preview/eval_l1": held_out_l1, "preview/eval_encoder_mse": held_out_enc})
        run.log.text(f"step {step}: held-out L1 to the VAE decode {held_out_l1:.4f}, "
                     f"encoder MSE to the diffusion latents {held_out_enc:.4f}")

    def export() -> None:
        decoder.save(Path(cfg.out) / "preview.safetensors")
        decoder.save_pretrained(Path(cfg.out) / "taesd")  # diffusers' AutoencoderTiny.from_pretrained reads it

    n_params = sum(p.numel() for p in decoder.parameters())
    about = (f", {n_params / 1e6:.3f}M parameters, f={cfg.decoder.downsample_factor}, "
             f"teacher {cfg.model or DEFAULT_MODEL_FILE}")
    return Task("preview decoder", {"decoder": decoder}, {"opt": opt}, prepare=prepare, step=step, grid=grid,
                grid_name="preview", export=export,
                evaluate=evaluate, about=about)


def train_preview(cfg: PreviewTrainConfig, resume: bool = False, resume_lr: float | None = None,
                  given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a preview decoder distillation. Returns the exit code."""
    return fit(cfg, build_preview, resume=resume, resume_lr=resume_lr, given=given)
