"""Seconds per image of the distillation table (docs/FAMILIES.md, issue 20): a teacher at 20 guided steps
and at 1-8 undistilled `lcm` steps, and its LCM and ADD students at 1-8 steps, all in one process, one
thread, rounds alternated (forward, then backward), medians of the rounds; each with the ratio to the
teacher's 20-step time measured in the same run.

    python benchmarks/distill_speed.py --lcm runs/lcm13 --add runs/add13 [--teacher t2i-shapes-layout] [--rounds 3]

Planning, text encoding and decoding are included, as `t2i eval shapes` draws its images.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import t2i
from t2i.distill.speed import PROMPTS, mean_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="t2i-shapes-layout")
    p.add_argument("--lcm", help="an LCM student (`t2i distill lcm` run folder)")
    p.add_argument("--add", help="an ADD student (`t2i distill add` run folder)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="images per setting and round")
    args = p.parse_args()
    torch.set_num_threads(1)
    models = {"teacher": t2i.load(args.teacher, precision="fp32")}
    settings = [("teacher", {"sampler": "dpmpp_2m", "steps": 20, "guidance": 1.5})]
    settings += [("teacher", {"sampler": "lcm", "steps": s, "guidance": 1.0}) for s in (1, 2, 4, 8)]
    for name, steps in (("lcm", (1, 2, 4, 8)), ("add", (1, 2, 4))):
        if getattr(args, name):
            models[name] = t2i.load(getattr(args, name), precision="fp32")
            settings += [(name, {"steps": s}) for s in steps]
    for m, kw in settings:
        models[m].generate(PROMPTS[0], seed=0, **kw)  # warm-up
    times: list[list[float]] = [[] for _ in settings]
    for r in range(args.rounds):
        order = range(len(settings)) if r % 2 == 0 else reversed(range(len(settings)))
        for i in order:
            m, kw = settings[i]
            times[i].append(mean_seconds(models[m], args.images, **kw))
    print(f"CPU: {t2i.cpu_description()}, 1 thread, {args.rounds} rounds of {args.images} images")
    base = statistics.median(times[0])
    for (m, kw), t in zip(settings, times, strict=True):
        med = statistics.median(t)
        print(f"{m:8s} {kw}: {med:.3f} s/image, {med / base:.2f} of the teacher's 20 steps "
              f"(rounds {', '.join(f'{x:.3f}' for x in t)})")


if __name__ == "__main__":
    main()
