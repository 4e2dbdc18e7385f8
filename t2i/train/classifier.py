"""Train the noise-aware classifier of classifier guidance (ADM, Dhariwal & Nichol 2021) with the one loop.

Data: the shapes world's one-object scenes (`t2i.train.dit.SingleObjects`), labelled from the scene truth
by the object's shape or its colour (`label`). Each step noises the images at t ~ U{0..T-1} of the
diffusion schedule the classifier will guide (`NoisyClassifierLoss`) and takes a cross-entropy step on the
pixel U-Net's encoder half (`t2i.nets.classifier`). The weights (no EMA: ADM's classifiers have none) are
exported as `classifier.safetensors` with the class names and the schedule; `t2i.systems.ddpm` guides
with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2i.data.captions import COLOURS, SHAPES
from t2i.data.shapes.sampling import BACKGROUND_P
from t2i.diffusion.losses import NoisyClassifierLoss
from t2i.nets.classifier import (
    NOISY_CLASSIFIER_PRESETS,
    NoisyClassifier,
    NoisyClassifierConfig,
    save_noisy_classifier,
)
from t2i.systems.ddpm import ddpm_schedule
from t2i.train.config import LoopConfig
from t2i.train.dit import SingleObjects
from t2i.train.fit import Run, Step, Task, fit

LABELS = {"shape": list(SHAPES), "colour": list(COLOURS)}


@dataclass
class ClassifierTrainConfig(LoopConfig):
    """One classifier run. `model` (the resolved NoisyClassifierConfig) is filled in at the start."""

    preset: str = "shapes_32"
    label: str = "shape"  # or "colour": what the classifier tells apart
    beta_schedule: str = "linear"  # the guided DDPM's: linear or cosine
    image_size: int = 32
    background_p: float | None = None  # share of black/gray backgrounds (None: the shapes world's own)
    weight_decay: float = 0.0
    steps: int = 5000
    batch_size: int = 32
    lr: float = 3e-4
    model: dict[str, Any] | None = None  # the export follows every checkpoint (LoopConfig.export_every 0)


def class_of(class_ids: torch.Tensor, label: str) -> torch.Tensor:
    """SingleObjects' class ids (colour * len(SHAPES) + shape, `t2i.train.dit.CLASSES`) -> the label's ids."""
    if label == "shape":
        return class_ids % len(SHAPES)
    if label == "colour":
        return class_ids // len(SHAPES)
    raise ValueError(f"unknown label {label!r}; choose from {sorted(LABELS)}")


def build_classifier(cfg: ClassifierTrainConfig, run: Run) -> Task:
    if cfg.label not in LABELS:
        raise ValueError(f"unknown label {cfg.label!r}; choose from {sorted(LABELS)}")
    if cfg.model is None:
        if cfg.preset not in NOISY_CLASSIFIER_PRESETS:
            raise ValueError(f"unknown classifier preset {cfg.preset!r}; "
                             f"choose from {sorted(NOISY_CLASSIFIER_PRESETS)}")
        trunk = dataclasses.replace(NOISY_CLASSIFIER_PRESETS[cfg.preset], sample_size=cfg.image_size)
        cfg.model = dataclasses.asdict(NoisyClassifierConfig(trunk=trunk, num_classes=len(LABELS[cfg.label])))
    model_cfg = NoisyClassifierConfig.from_dict(cfg.model)
    schedule = ddpm_schedule("squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else cfg.beta_schedule)
    net = NoisyClassifier(model_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = NoisyClassifierLoss(schedule.alphas_cumprod())
    data = SingleObjects(cfg.seed, cfg.image_size, BACKGROUND_P if cfg.background_p is None else cfg.background_p)
    parallel = run.parallel(net)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) in [-1, 1] and their labels (B,)."""
        x, class_ids = data.batch(position, cfg.batch_size, run.info)
        return x, class_of(class_ids, cfg.label)

    def step(batch: tuple[torch.Tensor, torch.Tensor], s: Step) -> dict[str, float]:
        x, labels = batch
        loss, accuracy = loss_fn.with_accuracy(parallel, x, labels, s.generator)
        gnorm = s.update(loss, opt, net.parameters())
        return {"classifier/loss": loss.item(), "classifier/accuracy": accuracy.item(), "classifier/grad_norm": gnorm}

    def export() -> None:
        save_noisy_classifier(net, Path(cfg.out) / "classifier.safetensors", LABELS[cfg.label], schedule)

    n_params = sum(p.numel() for p in net.parameters())
    about = f", noise-aware {cfg.label} classifier {n_params / 1e6:.2f}M parameters, {schedule.beta_schedule} betas"
    return Task("classifier", {"net": net}, {"opt": opt}, prepare=prepare, step=step, export=export, about=about)


def train_classifier(cfg: ClassifierTrainConfig, resume: bool = False, resume_lr: float | None = None,
                     given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a noise-aware classifier training. Returns the exit code."""
    return fit(cfg, build_classifier, resume=resume, resume_lr=resume_lr, given=given)
