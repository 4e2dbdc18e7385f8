"""Train one stage of an Imagen / DeepFloyd IF cascade on the shapes world with the one training loop
(`t2i train deepfloyd-if --stage base|sr`).

Both stages are `t2i.nets.if_unet.IFUNet`s with IF's recipe: cosine betas, eps prediction with a learned
variance trained by IDDPM's hybrid loss (L_simple + 0.001 L_vlb, `HybridLoss`), cross-attention to the
frozen MiniLM token states of the captions plus their attention-pooled summary in the time embedding
(Imagen's frozen text encoder; MiniLM is what every shapes model reads), 10% empty captions for
classifier-free guidance.

- base: 32x32 scenes from the text.
- sr: 64x64 scenes from the text and the same scene downsampled to 32x32 (area), upsampled back
  bilinearly (as the pipeline hands stage I's images over) and noised at a level drawn uniformly in
  0..max_aug_level per image (noise conditioning augmentation, `t2i.diffusion.noise_augmentation`),
  the level given to the network; `--no-noise-augmentation` (levels fixed at 0) is the ablation.

The EMA network is exported with the other stage (`--base-from` a base-stage file for sr, `--sr-from`
optionally for base) as one self-describing `model.safetensors` that the family (`t2i.systems.deepfloyd_if`)
loads, and sampled into captioned grids through the cascade.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.diffusion.denoiser import PREDICTIONS
from t2i.diffusion.losses import HybridLoss
from t2i.diffusion.noise_augmentation import NoiseAugmentation
from t2i.nets.if_unet import IF_UNET_PRESETS, IFUNet, IFUNetConfig
from t2i.systems.deepfloyd_if import IFConfig, LowResInput, if_file_pipeline, load_minilm, read_if_file, save_if
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS

STAGES = {"base": "shapes_base_32", "sr": "shapes_sr_64"}  # stage -> default preset


@dataclass
class IFTrainConfig(LoopConfig):
    """One stage's run. `model` (the resolved IFUNetConfig of the trained stage) is filled in at the start
    and saved in every checkpoint."""

    stage: str = "base"  # "base" or "sr"
    preset: str | None = None  # t2i.nets.if_unet.IF_UNET_PRESETS (None: the stage's shapes preset)
    image_size: int = 32  # the base stage's side; the sr stage trains at sr_factor times it
    sr_factor: int = 2
    base_from: str | None = None  # sr: the cascade's stage I (a t2i IF file, e.g. the base run's model)
    sr_from: str | None = None  # base: a stage II to export with it (a t2i IF file holding one)
    noise_augmentation: bool = True
    max_aug_level: int = 500  # sr: augmentation levels drawn uniformly in 0..this (of the cosine T = 1000)
    noise_level: int = 100  # the fixed level the exported cascade samples stage II with
    prediction_type: str = "epsilon"  # what this stage's network predicts (IF's eps; or "v_prediction")
    caption_dropout: float = 0.1
    text_length: int = 32
    background_p: float | None = None
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    ema_decay: float = 0.999
    export_every: int = 500
    sample_steps: int = 50
    model: dict[str, Any] | None = None


def resolve_net_config(cfg: IFTrainConfig, text_dim: int) -> IFUNetConfig:
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose base or sr")
    name = cfg.preset or STAGES[cfg.stage]
    if name not in IF_UNET_PRESETS:
        raise ValueError(f"unknown IF U-Net preset {name!r}; choose from {sorted(IF_UNET_PRESETS)}")
    net = IF_UNET_PRESETS[name]
    if (net.in_channels == 6) != (cfg.stage == "sr"):
        raise ValueError(f"preset {name!r} is a {'super-resolution' if net.in_channels == 6 else 'base'} network, "
                         f"not a {cfg.stage} stage")
    size = cfg.image_size * (cfg.sr_factor if cfg.stage == "sr" else 1)
    return dataclasses.replace(net, sample_size=size, encoder_hid_dim=text_dim)


def build_if(cfg: IFTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    sr = cfg.stage == "sr"
    if sr and not cfg.base_from:
        raise ValueError("--stage sr needs --base-from: the cascade's stage I (a `t2i train deepfloyd-if --stage "
                         "base` model file)")
    other = cfg.base_from if sr else cfg.sr_from
    file_cfg, base_net, sr_net = read_if_file(Path(other)) if other else (IFConfig(sr=None), None, None)
    # the base stage's text window is the cascade's (stage II reads the same encoding)
    text = text_encoder or load_minilm(file_cfg.text_length if sr else cfg.text_length)
    if cfg.model is None:
        cfg.model = dataclasses.asdict(resolve_net_config(cfg, text.context_dim))
    net_cfg = IFUNetConfig(**cfg.model)
    model_cfg = _model_config(cfg, file_cfg, net_cfg)
    size = net_cfg.sample_size
    data = open_data("shapes", None, size, cfg.seed, run.log.text, cfg.background_p)
    net = IFUNet(net_cfg)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    schedule = model_cfg.stage_schedule(cfg.stage)
    loss_fn = HybridLoss(schedule.alphas_cumprod(), schedule.prediction_type)
    augment = NoiseAugmentation(model_cfg.noising.alphas_cumprod(), max_level=cfg.max_aug_level)
    parallel = run.parallel(net)
    model = LowResInput(parallel) if sr else parallel

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (B, 3, S, S) in [-1, 1]; context (B, T, 384) of the captions (dropout from the step's
        generator); for sr also the augmented low-res input (B, 3, S, S) and its levels (B,)."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        cond = {"context": text.encode(["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
                                       ).context.float()}
        if sr:
            low = F.interpolate(x, scale_factor=1 / cfg.sr_factor, mode="area")  # (B, 3, S / f, S / f)
            up = F.interpolate(low, (size, size), mode="bilinear", align_corners=True)  # as the pipeline hands over
            if cfg.noise_augmentation:
                cond["low_res"], cond["noise_level"] = augment.sample(up, gen)
            else:
                cond["low_res"], cond["noise_level"] = up, torch.zeros(len(captions), dtype=torch.long)
        return x, cond

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        x, cond = batch
        simple, vlb = loss_fn.terms(model, x, cond, s.generator)  # (B,), (B,)
        loss = loss_fn.combine(simple, vlb)
        return {"if/loss": loss.item(), "if/grad_norm": s.update(loss, opt, net.parameters()),
                "if/simple": simple.mean().item(), "if/vlb_bpd": vlb.mean().item()}

    def stages() -> tuple[IFUNet, IFUNet | None]:
        return (base_net, ema.averaged) if sr else (ema.averaged, sr_net)  # type: ignore[return-value]

    def export() -> None:
        base, second = stages()
        save_if(base, second, model_cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) through the cascade with the EMA network."""
        pipe = if_file_pipeline(dataclasses.replace(model_cfg, steps=cfg.sample_steps), *stages(), text, "ema")
        pipe.sr_steps = min(pipe.sr_steps, cfg.sample_steps)
        return Grid(pipe.generate(list(SAMPLE_PROMPTS), seed=0).sample, list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in net.parameters())
    about = (f", IF {cfg.stage} stage {n_params / 1e6:.2f}M parameters at {size}x{size}, {schedule.prediction_type}"
             + (f", noise augmentation 0..{cfg.max_aug_level}" if sr and cfg.noise_augmentation else ""))
    return Task("deepfloyd_if", {"net": net, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def _model_config(cfg: IFTrainConfig, file_cfg: IFConfig, net_cfg: IFUNetConfig) -> IFConfig:
    """The exported cascade's config: the trained stage's network next to the other file's stage, each stage
    with its own parameterisation (the schedule's prediction_type is stage I's, sr_prediction_type stage II's
    where it differs)."""
    if cfg.prediction_type not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {cfg.prediction_type!r}; choose from {PREDICTIONS}")
    if cfg.stage == "sr":
        same = cfg.prediction_type == file_cfg.schedule.prediction_type
        return dataclasses.replace(file_cfg, sr=net_cfg, noise_level=cfg.noise_level if cfg.noise_augmentation else 0,
                                   sr_prediction_type=None if same else cfg.prediction_type)
    sr_prediction = file_cfg.stage_schedule("sr").prediction_type if file_cfg.sr is not None else None
    kept = None if sr_prediction in (None, cfg.prediction_type) else sr_prediction
    return dataclasses.replace(file_cfg, base=net_cfg, text_length=cfg.text_length, sr_prediction_type=kept,
                               schedule=dataclasses.replace(file_cfg.schedule, prediction_type=cfg.prediction_type))


def train_if(cfg: IFTrainConfig, resume: bool = False, resume_lr: float | None = None,
             text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) one IF stage's training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding and context_dim; default MiniLM."""
    return fit(cfg, partial(build_if, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)
