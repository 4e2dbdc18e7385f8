"""The curve of judge score against training: judge EMA snapshots of an LDM run on held-out prompts.

    python scripts/judge_snapshots.py runs/snap/*.safetensors --decoder runs/dec/vae.safetensors \
        --limit 10 --csv runs/curve.csv

Each snapshot (a `ShapesLDM` file, e.g. copies of runs/ldm/model.safetensors taken during
training and named ldm_<step>_<HHMM>.safetensors) is judged with its default sampler, steps and
guidance on the first `--limit` held-out prompts of each family (seed 0), with the autoencoder
swapped for `--decoder` (the decoder-only fine-tune: same encoder, so the same latent space)
so that every point is decoded alike. Appends one CSV row per snapshot; with --plot, draws the
whole CSV (accuracy per family against the LDM step in the snapshots' names) as a PNG.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from t2i.data.shapes.heldout import heldout_prompts
from t2i.data.shapes.prompts import first_per_family
from t2i.eval.shapes_judge import run_shapes_eval
from t2i.systems.shapes_ldm import ShapesLDM, load_text_encoder
from t2i.train.autoencoder import load_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("snapshots", nargs="*")
    p.add_argument("--decoder", default=None, help="autoencoder to decode with (default: the snapshot's own)")
    p.add_argument("--limit", type=int, default=10, help="held-out prompts per family")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--csv", default=None, help="append rows here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default=None, help="draw the --csv file's curve into this PNG")
    p.add_argument("--also", default=None, metavar="CSV", help="with --plot: draw this CSV's overall score too "
                   "(e.g. a later run judged on more prompts or with another decoder), labelled by its name")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = first_per_family(heldout_prompts(), args.limit)
    if args.plot and not args.csv:
        p.error("--plot draws the --csv file: give both")
    text_encoder = load_text_encoder(ShapesLDM.load(args.snapshots[0]).cfg) if args.snapshots else None
    decoder = load_vae(args.decoder).state_dict() if args.decoder else None
    for path in args.snapshots:
        model = ShapesLDM.load(path)
        if decoder is not None:
            model.vae.load_state_dict(decoder)
        pipe = model.pipeline(text_encoder)
        start = time.perf_counter()
        report = run_shapes_eval(
            lambda texts, pipe=pipe: pipe.generate(texts, seed=[0] * len(texts), guidance=args.guidance).images,
            prompts)
        row = {"snapshot": Path(path).name, "n": report["n"], "overall": round(report["overall"], 4),
               **{f: round(a, 4) for f, a in report["accuracy"].items()},
               "eval_s": round(time.perf_counter() - start, 1)}
        print(row, flush=True)
        if args.csv:
            new = not Path(args.csv).exists()
            with open(args.csv, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
    if args.plot:
        plot_curve(args.csv, args.plot, also=args.also)


def _step(row: dict) -> int:
    """The LDM step in a row's snapshot name (ldm_<step>_<HHMM>.safetensors)."""
    return int(row["snapshot"].split("_")[1])


def _rows(csv_path: str) -> list[dict]:
    """A CSV's rows in step order (rows are appended as snapshots get judged, in any order)."""
    with open(csv_path, newline="") as f:
        return sorted(csv.DictReader(f), key=_step)


def plot_curve(csv_path: str, png_path: str, also: str | None = None) -> None:
    """Judge accuracy per family (and overall) against the LDM step of each snapshot; `also`: another
    CSV's overall score on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(csv_path)
    steps = [_step(r) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in ("overall", "single", "region", "binding", "relation", "counting", "background"):
        ax.plot(steps, [float(r[key]) for r in rows], marker="o" if key == "overall" else ".",
                linewidth=2.5 if key == "overall" else 1, label=key)
    ax.set(xlabel="LDM training step (batch 32)", ylabel="judge accuracy", ylim=(-0.02, 1.02),
           title=f"shapes judge, {rows[0]['n']} held-out prompts per point")
    if also:
        more = _rows(also)
        ax.plot([_step(r) for r in more], [float(r["overall"]) for r in more], marker="s",
                linewidth=2.5, color="black", linestyle="--", label=f"overall, {Path(also).stem} ({more[0]['n']})")
    ax.axhline(0.9, color="gray", linestyle=":", linewidth=1)
    ax.axhline(0.8, color="gray", linestyle="--", linewidth=1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path)


if __name__ == "__main__":
    main()
