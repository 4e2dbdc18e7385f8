"""Seconds per image of every family in the shapes table (docs/FAMILIES.md), at each model's own
defaults (its size too: 64x64, or 32x32 for the pixel bases), one thread, in one process: the table's
"sampling" column, with each family's ratio to the plain shapes LDM (`t2i-shapes`) measured in the same run.

    python benchmarks/family_speed.py [--work runs/family_speed] [--rounds 3] [--images 4]
        [--tokenizer training_state/vq8_f8_512codes_step1300_fp16.safetensors] [--only ddpm,dit]

Sampling time does not depend on what the weights learned, so the families whose trained files are not
kept are rebuilt with the table's architecture and defaults by one-step runs of the table's own
`t2i train` commands (`--steps 1`, into --work, reused when already there; a cascade's second stage is a
one-step run given the first's file as `--base-from`); the shipped models are timed as shipped. Rounds
alternate the order (forward, then backward); medians of the rounds. Text encoding, planning and decoding
are included, as `t2i eval shapes` draws its images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

import torch

import t2i
from t2i.cli import main as t2i_main

PROMPTS = ("a red circle above a blue square", "three green triangles", "a small yellow cross on the left",
           "a pink circle on a gray background")
CLASS_PROMPTS = ("a red circle", "a green triangle", "a yellow cross", "a pink circle")  # DiT: one class each


Spec = str | list[str] | tuple[list[str], list[str]]


def families(tokenizer: str) -> dict[str, Spec]:
    """Family row -> a shipped model name, the `t2i train` arguments of the table's run (less --out/--steps),
    or a cascade's two runs (the second trained with `--base-from` the first's model)."""
    base = "t2i/assets/default/model.safetensors"
    return {
        "shapes_layout": "t2i-shapes-layout",
        "shapes_ldm": "t2i-shapes",
        "ddpm": ["ddpm", "--preset", "shapes_32_s", "--beta-schedule", "cosine", "--prediction", "v_prediction"],
        "glide": ["glide", "--prediction", "v_prediction"],
        "deepfloyd_if": (["deepfloyd-if", "--stage", "base"], ["deepfloyd-if", "--stage", "sr"]),
        "ediffi": ["ediffi", "--base", base, "--depth", "1", "--steps-per-expert", "1"],
        "parti": ["parti", "--vqvae", tokenizer],
        "dalle_mini": ["parti", "--preset", "dalle-mini", "--vqvae", tokenizer],
        "maskgit": ["maskgit", "--vqvae", tokenizer],
        "dalle": ["dalle", "--vqvae", tokenizer],
        "dalle_small": "t2i-dalle-small",
        "unclip": ["unclip-decoder", "--decoder-preset", "shapes_decoder_32_s"],  # a prior too, untrained
        "dit": ["dit"],
        "pixart": ["pixart"],
        "controlnet": ["controlnet", "--base", "t2i/assets/default"],  # on t2i-shapes, a box map as control
        # no generator: the small f8 tokenizer's codes optimised against the shapes CLIP, 100 Adam steps
        "vqgan_clip": "training_state/vq8s_f8small_512codes_step3000_fp16.safetensors",
    }


def build(name: str, args: list[str], work: Path) -> Path:
    """The model file (or folder) of a one-step run of `t2i train ARGS` in work/NAME, made once."""
    out = work / name
    model = out / {"ediffi": "model", "controlnet": "controlnet.safetensors"}.get(name, "model.safetensors")
    if not model.exists():
        extra = [] if name == "ediffi" else ["--steps", "1"]
        with contextlib.redirect_stderr(io.StringIO()):
            code = t2i_main(["train", *args, "--out", str(out), "--batch-size", "2", "--image-every", "0",
                             "--threads", "1", *extra])
        if code != 0 or not model.exists():
            raise SystemExit(f"`t2i train {' '.join(args)}` did not write {model} (exit {code})")
    return model


def load(name: str, model: str) -> tuple[object, dict]:
    """The pipeline and the request fields that draw with it: a ControlNet goes onto `t2i-shapes` with a
    two-box map (as `t2i eval shapes --layouts truth --controlnet` draws)."""
    if name != "controlnet":
        return t2i.load(model, precision="fp32"), {}
    from t2i.adapters.controlnet import box_map_image, load_controlnet
    from t2i.layout.spec import Layout, LayoutObject

    layout = Layout((LayoutObject("a red circle", (0.3, 0.05, 0.7, 0.45)),
                     LayoutObject("a blue square", (0.3, 0.55, 0.7, 0.95))))
    return t2i.load("t2i-shapes", precision="fp32"), {
        "controlnet": load_controlnet(model), "control_image": box_map_image(layout, 64, 64)}


def seconds(pipe, prompts: tuple[str, ...], images: int, settings: dict) -> float:
    """Mean wall-clock seconds of one image at the model's defaults (no warm-up), as `t2i eval shapes` draws it."""
    start = time.perf_counter()
    for i in range(images):
        pipe.generate(prompts[i % len(prompts)], seed=i, **settings)
    return (time.perf_counter() - start) / images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/family_speed", help="folder of the one-step runs (kept, reused)")
    p.add_argument("--tokenizer", default="training_state/vq8_f8_512codes_step1300_fp16.safetensors",
                   help="the VQ tokenizer of the token families' rows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=4, help="images per family and round")
    p.add_argument("--only", default=None, help="these families only (comma-separated; shapes_ldm is always timed)")
    args = p.parse_args()
    torch.set_num_threads(1)
    chosen = families(args.tokenizer)
    if args.only:
        wanted = {"shapes_ldm", *args.only.split(",")}
        if unknown := wanted - set(chosen):
            raise SystemExit(f"unknown families {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in wanted}
    pipes, extra = {}, {}
    for name, spec in chosen.items():
        if isinstance(spec, tuple):  # a cascade: the second stage's file holds both
            first = build(f"{name}_stage1", spec[0], Path(args.work))
            model = str(build(name, [*spec[1], "--base-from", str(first)], Path(args.work)))
        else:
            model = spec if isinstance(spec, str) else str(build(name, spec, Path(args.work)))
        pipes[name], extra[name] = load(name, model)
    prompts = {name: CLASS_PROMPTS if name == "dit" else PROMPTS for name in pipes}
    sizes = {name: pipe.generate(prompts[name][0], seed=0, **extra[name]).images[0].size  # warm-up
             for name, pipe in pipes.items()}
    names = list(pipes)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(seconds(pipes[name], prompts[name], args.images, extra[name]))
    print(f"CPU: {t2i.cpu_description()}; 1 thread, {args.rounds} rounds of {args.images} images")
    ref = statistics.median(times["shapes_ldm"])
    for name in names:
        d = pipes[name].defaults
        med = statistics.median(times[name])
        w, h = sizes[name]
        print(f"{name:14s} {w}x{h}, {d.sampler} {d.steps} steps, guidance {d.guidance}: {med:.3f} s/image, "
              f"{med / ref:.2f} x shapes_ldm (rounds {', '.join(f'{t:.3f}' for t in times[name])})")


if __name__ == "__main__":
    main()
