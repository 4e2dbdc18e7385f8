"""Seconds per image of a model at given settings: the speed column of the distillation table (issue 20).

    python -m t2i.distill.speed MODEL [--steps N] [--guidance G] [--sampler S] [--images 16] [--threads 1]

One image per call, as `t2i eval shapes` draws them, after one warm-up call; the model's defaults for what
is left out. Prints one line: the settings and the mean wall-clock seconds per image (planner, sampling
and decoding included).
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = ("a red circle above a blue square", "three green triangles", "a small yellow cross on the left",
           "a pink circle on a gray background")


def mean_seconds(pipe, images: int, **settings) -> float:
    """Mean seconds of `pipe.generate(PROMPTS[i % 4], seed=i, **settings)` over i < `images` (no warm-up)."""
    start = time.perf_counter()
    for i in range(images):
        pipe.generate(PROMPTS[i % len(PROMPTS)], seed=i, **settings)
    return (time.perf_counter() - start) / images


def seconds_per_image(model: str, images: int = 16, **settings) -> float:
    """`mean_seconds` of `model` loaded in fp32, after one warm-up call."""
    import t2i

    pipe = t2i.load(model, precision="fp32")
    pipe.generate(PROMPTS[0], seed=0, **settings)  # warm-up: first-call allocations, the planner's caches
    return mean_seconds(pipe, images, **settings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m t2i.distill.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--sampler")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("sampler", args.sampler))
                if v is not None}
    s = seconds_per_image(args.model, args.images, **settings)
    print(f"{args.model} {settings or 'defaults'}: {s:.3f} s/image ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
