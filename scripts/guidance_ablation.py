"""Guidance and x0-limit ablations on one pixel DDPM (issue 18; docs/FAMILIES.md, "Guidance and thresholding").

GLIDE compares classifier-free guidance with CLIP guidance (and ADM's classifier guidance before it) on one model;
Imagen compares static clipping of x0 with dynamic thresholding at large guidance weights. Both are arms here: the
same model, the same held-out prompts and seeds (`t2i eval shapes`'s: seed 0 for every prompt), each arm changing one
thing. Arms:

    cfg:W          classifier-free guidance weight W, x0 clipped to [-1, 1] (the DDPM's own setting)
    none:W         CFG W, x0 not limited
    dynamic:W      CFG W, x0 dynamically thresholded (p = --percentile, s capped at --max-value: Imagen's none)
    classifier:S   no CFG, ADM's classifier guidance at scale S (--classifier: `t2i train classifier --label shape`)
    clip:S         no CFG, GLIDE's CLIP guidance at scale S (--clip: `t2i train noisy-clip`)

Prints one JSON line per arm: the judge's pass rate, the share of saturated channel values (0-2 or 253-255: what
static clipping piles up at large W), the shapes-CLIP similarity to the prompt, and the exact McNemar test of its
verdicts against the first arm's. `--grid` writes the first 8 images of every arm, one row each.

    python scripts/guidance_ablation.py t2i-ddpm-small --classifier runs/clf/classifier.safetensors \
        --clip runs/noisy_clip/noisy_clip.safetensors --arm cfg:3 --arm classifier:3 --arm clip:100 --n 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
import torch

import t2i
from t2i.data.shapes.heldout import heldout_prompts
from t2i.data.shapes.prompts import first_per_family
from t2i.eval.paired import discordant, mcnemar_p
from t2i.eval.shapes_clip import ShapesCLIP
from t2i.eval.shapes_judge import judge
from t2i.eval.suites import save_prompt_grid

LIMITS = {"cfg": {"clip_sample": True, "thresholding": False},
          "none": {"clip_sample": False, "thresholding": False},
          "dynamic": {"clip_sample": False, "thresholding": True}}


def arm_settings(arm: str, args: argparse.Namespace, schedule):
    """An arm 'kind:value' -> (the schedule to sample with, the generate() keyword arguments)."""
    kind, _, value = arm.partition(":")
    number = float(value)
    if kind in LIMITS:
        limit = LIMITS[kind] | ({"dynamic_thresholding_ratio": args.percentile, "sample_max_value": args.max_value}
                                if kind == "dynamic" else {})
        return dataclasses.replace(schedule, **limit), {"guidance": number}
    files = {"classifier": args.classifier, "clip": args.clip}
    if kind not in files:
        raise SystemExit(f"unknown arm {arm!r}: expected cfg:W, none:W, dynamic:W, classifier:S or clip:S")
    if files[kind] is None:
        raise SystemExit(f"arm {arm!r} needs --{kind} FILE")
    return schedule, {"guidance": 1.0, "classifier": files[kind], "classifier_scale": number}


def saturation(images: torch.Tensor) -> float:
    """Share of channel values within 2 of 0 or 255 in (B, 3, H, W) images in [-1, 1]."""
    q = ((images.clamp(-1, 1) + 1) * 127.5).round()
    return float(((q <= 2) | (q >= 253)).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a text-conditional t2i DDPM (name, folder or file)")
    p.add_argument("--arm", action="append", required=True, help="cfg:W, none:W, dynamic:W, classifier:S, clip:S")
    p.add_argument("--classifier", help="a `t2i train classifier` file of the model's schedule")
    p.add_argument("--clip", help="a `t2i train noisy-clip` file of the model's schedule")
    p.add_argument("--family", default="single", help="held-out caption family (classifier guidance: single)")
    p.add_argument("--n", type=int, default=50, help="prompts: the family's first N held-out ones")
    p.add_argument("--percentile", type=float, default=0.995, help="dynamic thresholding's p")
    p.add_argument("--max-value", type=float, default=math.inf,
                   help="dynamic thresholding's cap on s (Imagen: none; DeepFloyd IF: 1.5, with p 0.95)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", help="PNG: the first 8 images of every arm")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = t2i.load(args.model, precision="fp32")
    own = pipe.schedule
    prompts = [t for f, t in first_per_family(heldout_prompts(), args.n) if f == args.family]
    clip = ShapesCLIP.load()
    with torch.no_grad():
        texts = clip.embed_texts(prompts)
    first: list[bool] | None = None
    rows = []
    for arm in args.arm:
        pipe.schedule, settings = arm_settings(arm, args, own)
        if args.steps:
            settings["steps"] = args.steps
        start = time.perf_counter()
        result = pipe.generate(prompts, seed=[args.seed] * len(prompts), **settings)
        seconds = time.perf_counter() - start
        verdicts = [judge(im, t).ok for im, t in zip(result.images, prompts, strict=True)]
        with torch.no_grad():
            pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in result.images]))
            x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
            similarity = (clip.encode_images(torch.nn.functional.interpolate(x, (64, 64), mode="bilinear"))
                          * texts).sum(-1)
        line = {"arm": arm, "n": len(prompts), "judge": sum(verdicts) / len(prompts),
                "saturated": round(saturation(result.sample), 4), "clip_score": round(float(similarity.mean()), 4),
                "seconds_per_image": round(seconds / len(prompts), 2)}
        if first is None:
            first = verdicts
        else:
            only_first, only_this = discordant(first, verdicts)
            line |= {"only_first": only_first, "only_this": only_this,
                     "mcnemar_p": round(mcnemar_p(only_first, only_this), 4)}
        print(json.dumps(line | {"verdicts": "".join("1" if v else "0" for v in verdicts)}), flush=True)
        rows.append((f"{arm}: {sum(verdicts)}/{len(prompts)}", result.images[:8]))
    if args.grid:
        save_prompt_grid(rows, args.grid, cell=64, text_width=160)  # columns: the family's first 8 prompts


if __name__ == "__main__":
    main()
