"""Train a pixel-space DDPM (Ho et al. 2020, Algorithm 1) with the one training loop.

The step function for `t2i.train.fit`: images in [-1, 1] -> DiffusionLoss with the eps target
(DDPM's L_simple: t ~ U{0..T-1}, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2) on the pixel
U-Net, linear or cosine betas (IDDPM eq. 17). A text-conditional network cross-attends to the
frozen MiniLM token states of the captions, 10% of them replaced by the empty caption so that
one network also learns the unconditional model for classifier-free guidance. The EMA weights
are exported as a self-describing `model.safetensors` (`t2i.systems.ddpm`) and sampled into
captioned grids.

`learn_sigma` (IDDPM, Nichol & Dhariwal 2021): the U-Net outputs 2C channels, its mean parameterisation (eps, v or
x0, `prediction_type`) then the variance interpolation values, trained by the hybrid loss L_simple + 0.001 L_vlb
(`HybridLoss`: L_vlb's mean is the posterior mean at the x0 the stopped-gradient first half implies, so the
parameterisation only changes how x0 is read); the family samples it with the learned variance
(`t2i.samplers.learned_variance`). v with a learned variance is what learns on the cosine schedule at our budget:
there the last timesteps' SNR (2.4e-9 at t = 999) leaves eps nothing to say about the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from t2i.diffusion.losses import DiffusionLoss, HybridLoss
from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
from t2i.systems.base import GenerationDefaults
from t2i.systems.ddpm import DDPMConfig, DDPMPipeline, ddpm_schedule, load_text_encoder, save_ddpm
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS


@dataclass
class DDPMTrainConfig(LoopConfig):
    """One DDPM run. `model` (the resolved DDPMConfig) is filled in at the start and saved in every
    checkpoint."""

    net_preset: str = "shapes_32"
    beta_schedule: str = "linear"  # or "cosine" (IDDPM)
    learn_sigma: bool = False  # IDDPM: 2C output channels (eps/v/x0, variance values), the hybrid loss
    # What the network predicts. "v_prediction" (Salimans & Ho 2022) keeps a learning signal for x0 where the
    # cosine schedule's SNR is near zero; eps there learns almost nothing about the image (see the model card).
    prediction_type: str = "epsilon"
    caption_dropout: float = 0.1
    data: str = "shapes"
    data_path: str | None = None
    image_size: int = 32
    background_p: float | None = None
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    export_every: int = 500
    sample_steps: int = 50
    model: dict[str, Any] | None = None


def resolve_model_config(cfg: DDPMTrainConfig) -> DDPMConfig:
    if cfg.net_preset not in PIXEL_UNET_PRESETS:
        raise ValueError(f"unknown pixel U-Net preset {cfg.net_preset!r}; choose from {sorted(PIXEL_UNET_PRESETS)}")
    net = dataclasses.replace(PIXEL_UNET_PRESETS[cfg.net_preset], sample_size=cfg.image_size)
    if cfg.learn_sigma:
        net = dataclasses.replace(net, out_channels=2 * net.in_channels)
    schedule = dataclasses.replace(
        ddpm_schedule("squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else cfg.beta_schedule),
        prediction_type=cfg.prediction_type)
    return DDPMConfig(net=net, schedule=schedule, text_encoder="minilm" if net.text_conditional else None,
                      image_size=cfg.image_size)


def build_ddpm(cfg: DDPMTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    if cfg.model is None:
        cfg.model = dataclasses.asdict(resolve_model_config(cfg))
    model_cfg = DDPMConfig.from_dict(cfg.model)
    text = (text_encoder or load_text_encoder(model_cfg)) if model_cfg.net.text_conditional else None
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    net = PixelUNet(model_cfg.net)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the network's output width says whether it learns its variance (files written before learn_sigma too)
    learned = model_cfg.net.out_channels == 2 * model_cfg.net.in_channels
    loss_fn = (HybridLoss if learned else DiffusionLoss)(model_cfg.schedule.alphas_cumprod(),
                                                         model_cfg.schedule.prediction_type)
    parallel = run.parallel(net)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (B, 3, H, W) in [-1, 1] and the network's conditioning (context (B, T, 384) of the
        captions, caption dropout drawn from the step's generator; {} for an unconditional net)."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        if text is None:
            return x, {}
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return x, {"context": text.encode(captions).context.float()}

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        x, cond = batch
        if not isinstance(loss_fn, HybridLoss):
            loss = loss_fn(parallel, x, cond, s.generator)
            gnorm = s.update(loss, opt, net.parameters())
            return {"ddpm/loss": loss.item(), "ddpm/grad_norm": gnorm}
        simple, vlb = loss_fn.terms(parallel, x, cond, s.generator)  # (B,), (B,)
        loss = loss_fn.combine(simple, vlb)
        return {"ddpm/loss": loss.item(), "ddpm/grad_norm": s.update(loss, opt, net.parameters()),
                "ddpm/simple": simple.mean().item(), "ddpm/vlb_bpd": vlb.mean().item()}

    def export() -> None:
        save_ddpm(ema.averaged, model_cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) from the EMA network with the model's default sampler."""
        defaults = GenerationDefaults(sampler=model_cfg.sampler, steps=cfg.sample_steps, guidance=model_cfg.guidance,
                                      width=cfg.image_size, height=cfg.image_size)
        pipe = DDPMPipeline(ema.averaged, model_cfg.schedule, text_encoder=text, name="ema", defaults=defaults)
        prompts = SAMPLE_PROMPTS if text is not None else [""] * 8
        images = pipe.generate(prompts, seed=0).sample
        return Grid(images, list(prompts))

    n_params = sum(p.numel() for p in net.parameters())
    about = (f", pixel U-Net {n_params / 1e6:.2f}M parameters, {model_cfg.schedule.beta_schedule} betas"
             + (", learned variance (hybrid loss)" if learned else ""))
    return Task("ddpm", {"net": net, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def train_ddpm(cfg: DDPMTrainConfig, resume: bool = False, resume_lr: float | None = None,
               text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a DDPM training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding; default the config's MiniLM."""
    return fit(cfg, partial(build_ddpm, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)
