"""Train the shapes CLIP (t2i.eval.shapes_clip) contrastively on the shapes world.

One explicit loop: read a batch of 64x64 renders and their training captions at the run's
data position (the endless shapes stream, held-out prompts excluded), score every image
against every caption, step on the symmetric InfoNCE loss with a learned temperature.
Learning rate: linear warm-up, then cosine decay to `min_lr_ratio` of the peak. Every
`eval_every` steps the held-out ranking accuracy is measured (true caption first among 8,
the judge's held-out scenes); each checkpoint also exports `shapes_clip.safetensors`.
Resumable bit for bit from the newest checkpoint (t2i.train.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
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
from t2i.train.checkpoint import restore, resume_run, save_and_prune
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.loop import RunLog, StopSignal, check_finite_loss, finish_run, set_lr, warmup_lr


@dataclass
class CLIPTrainConfig:
    """One shapes CLIP run. `out` holds checkpoints/, tb/, log.txt, shapes_clip.safetensors, metrics.jsonl."""

    out: str
    model: ShapesCLIPConfig = field(default_factory=ShapesCLIPConfig)
    image_size: int = 64
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = 1  # the default model trains on the same cores
    log_every: int = 25
    eval_every: int = 100  # held-out ranking accuracy; 0: only at the end
    eval_scenes: int = 300  # of the judge's 300 held-out scenes
    ckpt_every: int = 100
    keep: int = 2
    # Per image, one extra negative caption: its own caption with one word changed and judged false
    # for it (NegCLIP's idea, Yuksekgonul et al. 2023): random in-batch captions differ in almost
    # everything, so without these the model can pass as a bag of words; the reranker must tell
    # apart candidates that differ in one colour, side or count.
    hard_negatives: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTrainConfig:
        d = dict(d)
        return cls(model=ShapesCLIPConfig.from_dict(d.pop("model")), **d)


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


def train_clip(cfg: CLIPTrainConfig, resume: bool = False, resume_lr: float | None = None) -> int:
    """Run (or, with resume, continue) a shapes CLIP training. Returns the exit code."""
    out = Path(cfg.out)
    cfg, ckpt = resume_run(cfg, resume, lr=resume_lr)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    info = DistInfo()
    log = RunLog(out, info, 0, cfg.steps)
    data = open_data("shapes", None, cfg.image_size, cfg.seed, log.text)
    model = ShapesCLIP(cfg.model)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    modules, optimizers = {"model": model}, {"opt": opt}
    step, position = restore(ckpt, modules, optimizers)
    log.resumed_at(step)
    n_params = sum(p.numel() for p in model.parameters())
    log.text(f"clip run {out}: step {step}/{cfg.steps}, {n_params / 1e6:.2f}M parameters"
             + (f", resumed from {ckpt}" if ckpt else ""))
    eval_images, eval_candidates = ranking_set(heldout_scenes(cfg.eval_scenes))

    def evaluate() -> float:
        model.eval()
        acc = ranking_accuracy(model, eval_images, eval_candidates)
        model.train()
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "heldout_rank1_of_8": acc, "time": time.time()}) + "\n")
        log.text(f"step {step}: held-out ranking accuracy (true caption first of 8) {acc:.3f}")
        return acc

    def save() -> None:
        save_and_prune(out, cfg, step=step, data_position=position, modules=modules, optimizers=optimizers)
        model.save(out / "shapes_clip.safetensors")

    def prepare(position: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        x, captions, idx = data.batch(position, cfg.batch_size, info)  # (B, 3, S, S) in [-1, 1]
        negatives = []
        if cfg.hard_negatives:
            scenes = [shapes_example(cfg.seed, i, data.source.exclude)[0] for i in idx]
            negatives = hard_negatives(scenes, captions, cfg.seed, position)
        texts = captions + negatives
        return x, model.tokenizer.encode(texts), captions, texts

    # The next batch is rendered in a thread while this step trains (numpy and torch release
    # the GIL), so the one training thread is not kept waiting on the renderer.
    prefetch = ThreadPoolExecutor(1)
    model.train()
    t_data = t_step = 0.0
    with StopSignal() as stop:
        pending = prefetch.submit(prepare, position)
        while step < cfg.steps:
            t0 = time.perf_counter()
            x, ids, captions, texts = pending.result()
            if step + 1 < cfg.steps:
                pending = prefetch.submit(prepare, position + cfg.batch_size)
            t1 = time.perf_counter()
            lr = cosine_lr(step, cfg)
            set_lr(opt, lr)
            loss = contrastive_loss(model(x, ids), captions, texts)  # logits (B, len(texts))
            check_finite_loss(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            check_finite_loss(gnorm, step, "gradient norm")
            opt.step()
            position += cfg.batch_size
            step += 1
            t_data, t_step = t_data + t1 - t0, t_step + time.perf_counter() - t1
            log.advance({"loss": loss.item()})
            if step % cfg.log_every == 0:
                log.scalars(step, {"clip/loss": loss.item(), "clip/grad_norm": gnorm.item(), "lr": lr,
                                   "clip/logit_scale": model.logit_scale.exp().item(),
                                   "time/data_s": t_data / cfg.log_every, "time/step_s": t_step / cfg.log_every})
                t_data = t_step = 0.0
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                evaluate()
            stopping = stop.signum is not None
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                save()
            if stopping:
                log.text(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                break
    prefetch.shutdown(cancel_futures=True)
    return finish_run(log, stop, step, info)
