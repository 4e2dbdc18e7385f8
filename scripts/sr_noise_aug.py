"""Noise conditioning augmentation on vs off for a cascade's super-resolution stage (Imagen sec. 2.5, CDM; issue 18).

Two IF cascades with the same stage I, their stage II trained by the same command with and without
`--no-noise-augmentation`, compared on two inputs:

- the cascade: `t2i eval shapes` of each file (the judge on all 300 held-out prompts, stage II on stage I's own
  samples, each at its file's noise level), read from their results.json and paired prompt by prompt (exact
  McNemar): what augmentation is for, stage I's artefacts that training never showed stage II;
- the truth: stage II alone (`IFPipeline.super_resolve`) on the held-out scenes' own renders, area-downsampled
  as training downsamples them: PSNR against the full-size render and the judge, the clean-input control.

    t2i eval shapes --model AUG.safetensors --precision fp32 --out runs/eval_if
    t2i eval shapes --model NOAUG.safetensors --precision fp32 --out runs/eval_if_noaug
    python scripts/sr_noise_aug.py AUG.safetensors NOAUG.safetensors \
        --evals runs/eval_if/results.json runs/eval_if_noaug/results.json --per-family 17 --out R.json --grid G.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # t2i from this clone, installed or not

import t2i  # noqa: E402
from t2i.data.shapes.heldout import heldout_draws  # noqa: E402
from t2i.data.shapes.rendering import render_array  # noqa: E402
from t2i.eval.paired import discordant, mcnemar_p  # noqa: E402
from t2i.eval.shapes_judge import accuracy_by_family, judge, save_grid  # noqa: E402
from t2i.imageio import to_pil  # noqa: E402


def truth_inputs(per_family: int, size: int, factor: int) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """(families, prompts, full (N, 3, size, size), low (N, 3, size / factor, ...)) in [-1, 1]: the first
    per_family held-out scenes of each family rendered at `size`, downsampled by area as training does."""
    every = heldout_draws()
    draws = [d for f in dict.fromkeys(d[0] for d in every) for d in [x for x in every if x[0] == f][:per_family]]
    full = torch.stack([torch.from_numpy(render_array(scene, size)).permute(2, 0, 1) for _, scene, _ in draws])
    full = full.float() / 127.5 - 1
    return [d[0] for d in draws], [d[2] for d in draws], full, F.interpolate(full, scale_factor=1 / factor,
                                                                            mode="area")


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per image PSNR in dB of two (N, 3, H, W) batches in [-1, 1], on the [0, 1] scale."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1)
    return [10 * math.log10(1 / max(m, 1e-10)) for m in mse.tolist()]


def paired(aug: list[bool], noaug: list[bool]) -> dict:
    """The two arms' discordant counts on the same items and their exact McNemar p."""
    only_aug, only_noaug = discordant(aug, noaug)
    return {"only_aug": only_aug, "only_noaug": only_noaug, "mcnemar_p": round(mcnemar_p(only_aug, only_noaug), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("aug", help="the cascade whose stage II was trained with noise augmentation")
    p.add_argument("noaug", help="the same with --no-noise-augmentation")
    p.add_argument("--evals", nargs=2, metavar=("AUG_JSON", "NOAUG_JSON"),
                   help="results.json of `t2i eval shapes` on each file (same prompts and seed)")
    p.add_argument("--per-family", type=int, default=17, help="truth inputs: held-out scenes per caption family")
    p.add_argument("--batch", type=int, default=17)
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--grid", type=Path, help="judged grid of the truth inputs: rows input (nearest), render, "
                   "aug, noaug")
    args = p.parse_args()
    torch.set_num_threads(1)
    report: dict = {"cpu": t2i.cpu_description()}

    if args.evals:
        runs = [json.loads(Path(f).read_text())["results"] for f in args.evals]
        if [r["prompt"] for r in runs[0]] != [r["prompt"] for r in runs[1]]:
            raise SystemExit("the two evaluations judged different prompts")
        cascade = {}
        for name, results in zip(("aug", "noaug"), runs, strict=True):
            overall, by_family, _ = accuracy_by_family([r["family"] for r in results], [r["ok"] for r in results])
            cascade[name] = {"overall": round(overall, 3), "by_family": by_family}
        cascade["paired"] = paired([r["ok"] for r in runs[0]], [r["ok"] for r in runs[1]])
        report["cascade"] = cascade
        print(json.dumps({"cascade": cascade}), flush=True)

    pipes = {"aug": t2i.load(args.aug, precision="fp32"), "noaug": t2i.load(args.noaug, precision="fp32")}
    size = pipes["aug"].defaults.width
    families, prompts, full, low = truth_inputs(args.per_family, size, pipes["aug"].scale)
    truth: dict = {"n": len(prompts)}
    up = F.interpolate(low, size=full.shape[-2:], mode="nearest")
    rows = [(to_pil(up), [judge(im, pr).ok for im, pr in zip(to_pil(up), prompts, strict=True)], "input"),
            (to_pil(full), [judge(im, pr).ok for im, pr in zip(to_pil(full), prompts, strict=True)], "truth")]
    verdicts = {}
    for name, pipe in pipes.items():
        outs = torch.cat([pipe.super_resolve(prompts[i:i + args.batch], low[i:i + args.batch], seed=i)
                          for i in range(0, len(prompts), args.batch)])
        images = to_pil(outs)
        verdicts[name] = [judge(im, pr).ok for im, pr in zip(images, prompts, strict=True)]
        overall, by_family, _ = accuracy_by_family(families, verdicts[name])
        truth[name] = {"noise_level": pipe.noise_level, "judge": round(overall, 3), "by_family": by_family,
                       "psnr_db": round(float(np.mean(psnr(outs, full))), 2)}
        rows.append((images, verdicts[name], name))
        print(json.dumps({name: truth[name]}), flush=True)
    truth["judge_on_the_renders"] = round(float(np.mean(rows[1][1])), 3)
    truth["judge_on_the_inputs"] = round(float(np.mean(rows[0][1])), 3)
    truth["paired"] = paired(verdicts["aug"], verdicts["noaug"])
    report["truth_inputs"] = truth
    print(json.dumps({"truth_inputs_paired": truth["paired"]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.grid:
        cols = list(range(0, len(prompts), max(1, len(prompts) // 8)))[:8]
        images = [im for ims, _, _ in rows for im in [ims[c] for c in cols]]
        oks = [ok for _, v, _ in rows for ok in [v[c] for c in cols]]
        save_grid(images, [f"{name}: {prompts[c]}" for _, _, name in rows for c in cols], oks, str(args.grid),
                  cols=len(cols))


if __name__ == "__main__":
    main()
