"""Train GLIDE (`t2i train glide --stage base|up`) and its noise-aware CLIP (`t2i train noisy-clip`) on the shapes world
with the one training loop.

GLIDE (`t2i.systems.glide`): the caption transformer and the U-Net are one network trained together from scratch
on the caption's word ids; cosine betas, eps (GLIDE's) or v (`--prediction v_prediction`: what learns at our
budget, the cosine schedule's last SNRs leaving eps nothing to learn about the image) with a learned variance by
IDDPM's hybrid loss (L_simple + 0.001 L_vlb, `HybridLoss`; L_vlb's mean comes from the x0 the stopped-gradient
prediction implies, whatever it parameterises), 20% of the captions replaced by the empty one (GLIDE fine-tunes
for classifier-free guidance with 20% of the token sequences empty; here from the first step) so that the network
is also the unconditional model of classifier-free guidance.

- base: 32x32 scenes from their captions.
- up: 64x64 scenes from their captions and the same scene area-downsampled to 32x32 (the network upsamples it
  bilinearly, GLIDE's SuperResText2ImUNet); `--base-from` names the base model exported with it.

The EMA network is exported with the other stage as one `model.safetensors` and sampled into captioned grids.

Noise-aware CLIP (`t2i.nets.glide_clip`, GLIDE's noised CLIP): the shipped shapes CLIP's image tower fine-tuned on
noised images x_t (t ~ U{0..T-1} of GLIDE's schedule, `DiffusionLoss.noised`) at the diffusion model's side, with
the symmetric contrastive loss against its frozen text tower (and frozen temperature); exported as
`noisy_clip.safetensors` with the schedule. Both runs resume bit for bit from their newest checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.diffusion.losses import DiffusionLoss, HybridLoss
from t2i.eval.shapes_clip import ShapesCLIP, contrastive_loss
from t2i.nets.glide import GlideNet, GlideNetConfig, preset
from t2i.nets.glide_clip import from_clean, save_noisy_clip
from t2i.systems.glide import (
    GlideConfig,
    GlideNets,
    GlidePipeline,
    glide_schedule,
    read_glide,
    save_glide,
    shapes_words,
)
from t2i.text.words import SPECIALS, WordTokenizer
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS

STAGES = {"base": "shapes_base_32", "up": "shapes_up_64"}  # stage -> default preset


@dataclass
class GlideTrainConfig(LoopConfig):
    """One stage's run. `model` (the resolved GlideNetConfig of the trained stage) is filled in at the start and
    saved in every checkpoint."""

    stage: str = "base"  # "base" or "up"
    preset: str | None = None  # t2i.nets.glide.GLIDE_PRESETS (None: the stage's shapes preset)
    image_size: int = 32  # the base stage's side; the upsampler trains at up_factor times it
    up_factor: int = 2
    base_from: str | None = None  # up: the cascade's base (a t2i GLIDE file, e.g. the base run's model)
    up_from: str | None = None  # base: an upsampler to export with it (a t2i GLIDE file holding one)
    prediction_type: str = "epsilon"  # what this stage's network predicts (or "v_prediction", "sample")
    caption_dropout: float = 0.2
    text_length: int | None = None  # caption tokens (None: the preset's)
    background_p: float | None = None
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    ema_decay: float = 0.999
    export_every: int = 500
    sample_steps: int = 50
    model: dict[str, Any] | None = None


def resolve_net_config(cfg: GlideTrainConfig) -> GlideNetConfig:
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose base or up")
    net = preset(cfg.preset or STAGES[cfg.stage], len(SPECIALS) + len(shapes_words()), cfg.text_length,
                 sample_size=cfg.image_size * (cfg.up_factor if cfg.stage == "up" else 1))
    if net.upsampler != (cfg.stage == "up"):
        raise ValueError(f"preset {cfg.preset!r} is {'an upsampler' if net.upsampler else 'a base'} network, not a "
                         f"{cfg.stage} stage")
    return net


def caption_dropout(captions: list[str], p: float, gen: torch.Generator) -> list[str]:
    """Each caption replaced by the empty one with probability p (drawn from the step's generator)."""
    drop = torch.rand(len(captions), generator=gen) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]


def build_glide(cfg: GlideTrainConfig, run: Run) -> Task:
    up = cfg.stage == "up"
    if up and not cfg.base_from:
        raise ValueError("--stage up needs --base-from: the cascade's base (a `t2i train glide --stage base` model "
                         "file)")
    other = cfg.base_from if up else cfg.up_from
    other_nets = read_glide(other) if other else None
    if cfg.model is None:
        cfg.model = dataclasses.asdict(resolve_net_config(cfg))
    net_cfg = GlideNetConfig.from_dict(cfg.model)
    model_cfg = _model_config(cfg, other_nets, net_cfg)
    size = net_cfg.unet.sample_size
    data = open_data("shapes", None, size, cfg.seed, run.log.text, cfg.background_p)
    tokenizer = WordTokenizer(model_cfg.words, net_cfg.text.length)
    net = GlideNet(net_cfg)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    schedule = model_cfg.stage_schedule(cfg.stage)
    loss_fn = HybridLoss(schedule.alphas_cumprod(), schedule.prediction_type)
    parallel = run.parallel(net)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (B, 3, S, S) in [-1, 1]; the captions' word ids (B, L), 20% empty; for the upsampler also the
        images area-downsampled by up_factor (B, 3, S / f, S / f)."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        cond = {"tokens": tokenizer(caption_dropout(captions, cfg.caption_dropout, gen))}
        if up:
            cond["low_res"] = F.interpolate(x, scale_factor=1 / cfg.up_factor, mode="area")
        return x, cond

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        x, cond = batch
        simple, vlb = loss_fn.terms(parallel, x, cond, s.generator)  # (B,), (B,)
        loss = loss_fn.combine(simple, vlb)
        return {"glide/loss": loss.item(), "glide/grad_norm": s.update(loss, opt, net.parameters()),
                "glide/simple": simple.mean().item(), "glide/vlb_bpd": vlb.mean().item()}

    def stages() -> GlideNets:
        """The EMA network next to the other file's stage (no copies)."""
        if up:
            return GlideNets(model_cfg, base=other_nets.base, up=ema.averaged)  # type: ignore[union-attr]
        return GlideNets(model_cfg, base=ema.averaged, up=None if other_nets is None else other_nets.up)

    def export() -> None:
        nets = stages()
        save_glide(nets.base, nets.up, model_cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) through the cascade with the EMA network."""
        pipe = GlidePipeline(stages(), name="ema")
        pipe.up_steps = min(pipe.up_steps, cfg.sample_steps)
        return Grid(pipe.generate(list(SAMPLE_PROMPTS), seed=0, steps=cfg.sample_steps).sample, list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in net.parameters())
    about = (f", GLIDE {cfg.stage} stage {n_params / 1e6:.2f}M parameters (text transformer included) at {size}x{size}"
             f", {schedule.prediction_type} with a learned variance")
    return Task("glide", {"net": net, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def _model_config(cfg: GlideTrainConfig, other: GlideNets | None, net_cfg: GlideNetConfig) -> GlideConfig:
    """The exported cascade's config: the trained stage's network and parameterisation next to the other file's
    stage, which keeps its own (the schedule's prediction_type is the base's, up_prediction_type the upsampler's)."""
    if cfg.stage == "up":
        assert other is not None
        return dataclasses.replace(other.cfg, up=net_cfg, up_prediction_type=cfg.prediction_type)
    if other is None:
        return GlideConfig(base=net_cfg, up=None, schedule=glide_schedule(cfg.prediction_type))
    return dataclasses.replace(other.cfg, base=net_cfg,
                               schedule=dataclasses.replace(other.cfg.schedule, prediction_type=cfg.prediction_type),
                               up_prediction_type=other.cfg.stage_schedule("up").prediction_type)


def train_glide(cfg: GlideTrainConfig, resume: bool = False, resume_lr: float | None = None,
                given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) one GLIDE stage's training. Returns the exit code."""
    return fit(cfg, build_glide, resume=resume, resume_lr=resume_lr, given=given)


# ---------------------------------------------------------------------------------------
# The noise-aware CLIP
# ---------------------------------------------------------------------------------------


@dataclass
class NoisyCLIPTrainConfig(LoopConfig):
    """One noise-aware CLIP run, starting from a trained shapes CLIP (`clip_from`; None: the shipped one)."""

    clip_from: str | None = None
    image_size: int = 32  # the guided model's side (its base stage)
    background_p: float | None = None
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    export_every: int = 500


def build_noisy_clip(cfg: NoisyCLIPTrainConfig, run: Run) -> Task:
    schedule = glide_schedule()
    model = from_clean(ShapesCLIP.load(cfg.clip_from), cfg.image_size)
    model.clip.text.requires_grad_(False)  # GLIDE's guidance reads the text tower as it is
    model.clip.logit_scale.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    draws = DiffusionLoss(schedule.alphas_cumprod())
    data = open_data("shapes", None, cfg.image_size, cfg.seed, run.log.text, cfg.background_p)
    encode = run.parallel(model)
    scale = model.clip.logit_scale.exp().item()

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)  # (B, 3, S, S) in [-1, 1]
        with torch.no_grad():
            text = model.clip.encode_texts(model.clip.tokenizer.encode(captions))  # (B, E), frozen
        return x, captions, text

    def step(batch: tuple[torch.Tensor, list[str], torch.Tensor], s: Step) -> dict[str, float]:
        x, captions, text = batch
        t, _, _, x_t = draws.noised(x, s.generator)
        image = encode(x_t, t.to(torch.float32))  # (B, E)
        logits = scale * image @ text.T  # (B, B)
        loss = contrastive_loss(logits, captions)
        accuracy = (logits.argmax(1) == torch.arange(len(captions))).float().mean()
        return {"noisy_clip/loss": loss.item(), "noisy_clip/grad_norm": s.update(loss, opt, trained),
                "noisy_clip/batch_top1": accuracy.item()}

    n_params = sum(p.numel() for p in trained)
    return Task("noisy_clip", {"model": model}, {"opt": opt}, prepare=prepare, step=step,
                export=lambda: save_noisy_clip(model, schedule, Path(cfg.out) / "noisy_clip.safetensors"),
                about=f", image tower + time embedding {n_params / 1e6:.2f}M parameters trained at "
                      f"{cfg.image_size}x{cfg.image_size}, {schedule.beta_schedule} betas")


def train_noisy_clip(cfg: NoisyCLIPTrainConfig, resume: bool = False, resume_lr: float | None = None,
                     given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a noise-aware CLIP training. Returns the exit code."""
    return fit(cfg, build_noisy_clip, resume=resume, resume_lr=resume_lr, given=given)
