"""Train the latent diffusion U-Net on a frozen autoencoder and a frozen text encoder.

The step function for `t2i.train.fit` with SD's conditioning: images -> posterior sample of the
frozen VAE (scaled) -> DiffusionLoss (eps or v, Min-SNR weighting) on the U-Net with
cross-attention to MiniLM token states (the step's captions encoded as one batch), 10% of captions replaced
by the empty caption so one network also learns the unconditional model for CFG, AdamW
with linear warm-up, gradient clipping, EMA weights. The EMA model is exported as a
self-describing `model.safetensors` (`t2i.systems.shapes_ldm.ShapesLDM`) and sampled into
captioned PNG grids along the way.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from t2i.diffusion.losses import DiffusionLoss
from t2i.systems.shapes_ldm import UNET_PRESETS, ShapesLDM, ShapesLDMConfig, load_text_encoder
from t2i.train.autoencoder import load_vae
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit

# Prompts of the periodic sample grids: one per judge family.
SAMPLE_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow diamond",
    "a small purple cross on the left", "a large orange circle in the top right",
    "a red circle above a blue square", "a cyan square left of a pink triangle",
    "a green circle and a yellow square", "three blue circles", "two red squares and a green cross",
    "a purple diamond on a black background", "a pink circle on a gray background", "a large blue diamond",
    "an orange cross below a cyan circle", "four yellow triangles",
]


@dataclass
class LDMTrainConfig(LoopConfig):
    """One latent diffusion run. `model` is filled in from the presets and the VAE file at the
    start of the run (with the latent scaling factor measured) and saved in every checkpoint."""

    vae_path: str = ""  # vae.safetensors written by `t2i train autoencoder`
    unet_preset: str = "shapes_s"
    prediction_type: str = "v_prediction"
    min_snr_gamma: float = 5.0  # 0: plain MSE
    caption_dropout: float = 0.1
    data: str = "shapes"
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 20000
    batch_size: int = 32  # per rank
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    bf16: bool = False
    export_every: int = 500
    sample_steps: int = 20
    # Warm start from a shipped model file (ShapesLDM): its config, autoencoder and U-Net (as both the
    # trained and the EMA weights; the optimizer starts afresh). How training continues across
    # machines that keep nothing but the repository. vae_path may then be empty.
    init_from: str | None = None
    model: dict[str, Any] | None = None  # the resolved ShapesLDMConfig


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, data, n: int = 256, batch: int = 32) -> float:
    """1 / std of posterior samples of the first n items (LDM's scaling factor: the latents the
    U-Net trains on, which are posterior samples, get unit variance)."""
    zs, gen = [], torch.Generator().manual_seed(0)
    for pos in range(0, n, batch):
        x, _, _ = data.batch(pos, batch, DistInfo())
        zs.append(vae.encode(x).sample(gen))
    return float(1.0 / torch.cat(zs).std())


def resolve_model_config(cfg: LDMTrainConfig, vae: torch.nn.Module, data) -> ShapesLDMConfig:
    unet_cfg = dataclasses.replace(UNET_PRESETS[cfg.unet_preset])
    model_cfg = ShapesLDMConfig(vae=dataclasses.replace(vae.cfg), unet=unet_cfg, image_size=cfg.image_size)
    model_cfg.schedule.prediction_type = cfg.prediction_type
    model_cfg.vae.scaling_factor = latent_scale(vae, data)
    model_cfg.unet.sample_size = cfg.image_size // model_cfg.vae.downsample_factor
    return model_cfg


def build_ldm(cfg: LDMTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    init = ShapesLDM.load(cfg.init_from) if cfg.init_from else None
    vae = init.vae if init is not None else load_vae(cfg.vae_path)
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p)
    if cfg.model is None:
        cfg.model = (init.cfg if init is not None else resolve_model_config(cfg, vae, data)).to_dict()
    model_cfg = ShapesLDMConfig.from_dict(cfg.model)
    vae.cfg.scaling_factor = model_cfg.vae.scaling_factor
    text = text_encoder or load_text_encoder(model_cfg)

    system = ShapesLDM(model_cfg)  # holds the U-Net being trained and the frozen VAE it samples with
    system.vae.load_state_dict(vae.state_dict())
    system.vae.requires_grad_(False).eval()
    unet = system.unet
    if init is not None:
        unet.load_state_dict(init.unet.state_dict())
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiffusionLoss(model_cfg.schedule.alphas_cumprod(), cfg.prediction_type, cfg.min_snr_gamma or None)
    net = run.parallel(unet)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything frozen for one step: latents (B, 4, h, w) and context (B, T, 384); draws the
        caption dropout and the posterior samples from the step's generator."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        z = vae.scale(vae.encode(x).sample(gen))  # (B, 4, h, w) diffusion latents
        # One batched call per step (not per caption, not cached): 3x cheaper than single captions,
        # and a step's batch is fixed by its position, so a resumed run sees the same numbers.
        return z, text.encode(captions).context.float()

    def step(batch: tuple[torch.Tensor, torch.Tensor], s: Step) -> dict[str, float]:
        z, context = batch
        with autocast:
            loss = loss_fn(net, z, {"context": context}, s.generator)
        gnorm = s.update(loss, opt, unet.parameters())
        return {"ldm/loss": loss.item(), "ldm/grad_norm": gnorm}

    def export() -> None:
        shipped = ShapesLDM(model_cfg)
        shipped.vae.load_state_dict(vae.state_dict())
        shipped.unet.load_state_dict(ema.averaged.state_dict())
        shipped.save(Path(cfg.out) / "model.safetensors")

    n_params = sum(p.numel() for p in unet.parameters())
    about = (f", U-Net {n_params / 1e6:.2f}M parameters, latent scale {model_cfg.vae.scaling_factor:.4f}"
             + (f", warm start from {cfg.init_from}" if init is not None else ""))
    return Task("ldm", {"unet": unet, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=lambda: sample_grid(ema.averaged, system, text, cfg.sample_steps), export=export, about=about)


def train_ldm(cfg: LDMTrainConfig, resume: bool = False, resume_lr: float | None = None,
              text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a latent diffusion training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding; default the config's MiniLM.
    """
    return fit(cfg, partial(build_ldm, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)


@torch.no_grad()
def sample_grid(ema: torch.nn.Module, system: ShapesLDM, text_encoder: torch.nn.Module, steps: int) -> Grid:
    """SAMPLE_PROMPTS (seed 0 each) generated with the EMA U-Net and the model's default sampler."""
    train_unet = system.unet
    system.unet = ema
    try:
        pipe = system.pipeline(text_encoder)
        images = [pipe.generate(p, seed=0, steps=steps).latents for p in SAMPLE_PROMPTS]
        decoded = system.vae.decode(system.vae.unscale(torch.cat(images)))
    finally:
        system.unet = train_unet
    return Grid(decoded, list(SAMPLE_PROMPTS))
