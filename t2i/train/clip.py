"""Train the shapes CLIP (t2i.eval.shapes_clip) contrastively on the shapes world.

The step function for `t2i.train.fit`: a batch of 64x64 renders and their training captions at
the run's data position (the endless shapes stream, held-out prompts excluded), every image
scored against every caption, a step on the symmetric InfoNCE loss with a learned temperature.
Learning rate: linear warm-up, then cosine decay to `min_lr_ratio` of the peak. Every
`eval_every` steps the held-out ranking accuracy is measured (true caption first among 8,
the judge's held-out scenes); each checkpoint also exports `shapes_clip.safetensors`.
Resumable bit for bit from the newest checkpoint (t2i.train.checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i.data.shapes import Scene, shapes_example
from t2i.data.shapes.prompts import parse_prompt
from t2i.eval.shapes_clip import (
    ShapesCLIP,
    ShapesCLIPConfig,
    contrastive_loss,
    heldout_scenes,
    one_word_edits,
    ranking_accuracy,
    ranking_set,
)
from t2i.eval.shapes_judge import Detection, check
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.fit import Run, Step, Task, fit
from t2i.train.loop import warmup_lr


@dataclass
class CLIPTrainConfig(LoopConfig):
    """One shapes CLIP run. `out` holds checkpoints/, tb/, log.txt, shapes_clip.safetensors, metrics.jsonl."""

    model: ShapesCLIPConfig = field(default_factory=ShapesCLIPConfig)
    image_size: int = 64
    batch_size: int = 128
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    threads: int | None = 1  # the default model trains on the same cores
    eval_every: int = 100  # held-out ranking accuracy; 0: only at the end
    eval_scenes: int = 300  # of the judge's 300 held-out scenes
    ckpt_every: int = 100
    image_every: int = 0  # (no sample grids)
    # Per image, one extra negative caption: its own caption with one word changed and judged false
    # for it (NegCLIP's idea, Yuksekgonul et al. 2023): random in-batch captions differ in almost
    # everything, so without these the model can pass as a bag of words; the reranker must tell
    # apart candidates that differ in one colour, side or count.
    hard_negatives: bool = True


def cosine_lr(step: int, cfg: CLIPTrainConfig) -> float:
    """Warm-up (t2i.train.loop.warmup_lr), then half a cosine from lr down to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return warmup_lr(step, cfg.lr, cfg.warmup)
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def scene_truth(scene: Scene) -> tuple[str, list[Detection]]:
    """A scene's ground truth in the judge's terms (background, detections), for checking captions
    without rendering and detecting: exact, and ~100x cheaper than the judge on pixels."""
    return scene.background, [Detection(o.colour, o.shape, o.size, tuple(float(v) for v in o.box), o.centre,
                                        o.s * o.s, 1.0) for o in scene.objects]


def hard_negatives(scenes: list[Scene], captions: list[str], seed: int, position: int) -> list[str]:
    """For each scene, a one-word edit of its caption that is false of it (tried in an order drawn
    from (seed, position), so a resumed run draws the same); scenes whose edits are all true (rare)
    get none."""
    out = []
    for i, (scene, caption) in enumerate(zip(scenes, captions, strict=True)):
        background, detections = scene_truth(scene)
        edits = one_word_edits(caption)
        for j in np.random.default_rng([seed, position, i]).permutation(len(edits)):
            if not check(parse_prompt(edits[j]), background, detections).ok:
                out.append(edits[j])
                break
    return out


def _param_groups(model: ShapesCLIP, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, embeddings' 1-d parts or the logit scale
    (CLIP's recipe; decaying the temperature would pull it back towards 1)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_clip(cfg: CLIPTrainConfig, run: Run) -> Task:
    data = open_data("shapes", None, cfg.image_size, cfg.seed, run.log.text)
    model = ShapesCLIP(cfg.model)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    net = run.parallel(model)
    eval_images, eval_candidates = ranking_set(heldout_scenes(cfg.eval_scenes))

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        x, captions, idx = data.batch(position, cfg.batch_size, run.info)  # (B, 3, S, S) in [-1, 1]
        negatives = []
        if cfg.hard_negatives:
            scenes = [shapes_example(cfg.seed, i, data.source.exclude)[0] for i in idx]
            negatives = hard_negatives(scenes, captions, cfg.seed, position)
        texts = captions + negatives
        return x, model.tokenizer.encode(texts), captions, texts

    def step(batch: tuple[torch.Tensor, torch.Tensor, list[str], list[str]], s: Step) -> dict[str, float]:
        x, ids, captions, texts = batch
        loss = contrastive_loss(net(x, ids), captions, texts)  # logits (B, len(texts))
        gnorm = s.update(loss, opt, model.parameters())
        return {"clip/loss": loss.item(), "clip/grad_norm": gnorm, "clip/logit_scale": model.logit_scale.exp().item()}

    def evaluate(step: int) -> None:
        model.eval()
        acc = ranking_accuracy(model, eval_images, eval_candidates)
        model.train()
        with open(Path(cfg.out) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "heldout_rank1_of_8": acc, "time": time.time()}) + "\n")
        run.log.text(f"step {step}: held-out ranking accuracy (true caption first of 8) {acc:.3f}")

    n_params = sum(p.numel() for p in model.parameters())
    return Task("clip", {"model": model}, {"opt": opt}, prepare=prepare, step=step, lr=lambda s: cosine_lr(s, cfg),
                export=lambda: model.save(Path(cfg.out) / "shapes_clip.safetensors"), evaluate=evaluate,
                about=f", {n_params / 1e6:.2f}M parameters")


def train_clip(cfg: CLIPTrainConfig, resume: bool = False, resume_lr: float | None = None,
               given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a shapes CLIP training. Returns the exit code."""
    return fit(cfg, build_clip, resume=resume, resume_lr=resume_lr, given=given)
