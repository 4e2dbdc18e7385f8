"""int8 against fp32 and bf16 on this CPU: the numbers `precision="auto"` is decided from.

    python benchmarks/int8.py                  # one thread, 5 repeats, every part
    python benchmarks/int8.py --parts linear conv --repeats 3

Parts, each side timed warm, the sides alternated (A B C A B C ...) so a load change on the
shared machine hits them all; medians, and each side as a fraction of fp32:
  linear  one SD-1.5-sized Linear: (4096, 1280) @ (1280, 1280) + bias
  conv    one SD-1.5-sized 3x3 convolution, 320 -> 320 channels on (2, 320, 64, 64): fp32, bf16 and
          t2i's int8 convolution (dynamic activation quantization included)
  unet    one guided U-Net step of the built-in model (batch 2, 16x16 latents, 32 context tokens)
  image   the built-in model's whole `generate` at 64x64 (text, 20 steps with guidance, decode)
  sd      one SD 1.5 U-Net step (random weights, t2i's `sd15` preset), batch 1 at 32x32 latents
          (256x256 images), 77 context tokens; also each variant's output error against fp32
The variants: fp32; bf16 (weights and compute); int8+fp32 (t2i.quantize: int8 U-Net Linears and
3x3 convolutions, everything else fp32); int8+bf16 (the same int8 layers, the rest in bf16).
The CPU (model name, family/model numbers, int8 and bf16 flags) and `uptime` are printed first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

import t2i

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_cpu import alternate, report  # noqa: E402

PROMPT = "a red circle above a blue square"


def bench_linear(repeats: int) -> None:
    from t2i.quantize import quantize_

    x = torch.randn(4096, 1280)
    lin = nn.Linear(1280, 1280)
    bf = nn.Linear(1280, 1280).to(torch.bfloat16)
    q = quantize_(nn.Sequential(nn.Linear(1280, 1280)), t2i.has_vnni())
    xb = x.bfloat16()
    report("Linear (4096, 1280) @ (1280, 1280)", alternate({"fp32": lambda: lin(x), "bf16": lambda: bf(xb),
                                                             "int8": lambda: q(x)}, repeats), base="fp32")


def bench_conv(repeats: int) -> None:
    from t2i.quantize import Int8Conv2d

    x = torch.randn(2, 320, 64, 64)
    conv = nn.Conv2d(320, 320, 3, padding=1)
    bf = nn.Conv2d(320, 320, 3, padding=1).to(torch.bfloat16)
    xb = x.bfloat16()
    q = Int8Conv2d(conv, t2i.has_vnni())
    report("Conv2d 3x3 320->320 on (2, 320, 64, 64)",
           alternate({"fp32": lambda: conv(x), "bf16": lambda: bf(xb), "int8 (bf16 in and out)": lambda: q(xb)},
                     repeats), base="fp32")


def pipelines() -> dict:
    """The built-in model in fp32, bf16, and with int8 U-Net Linears over each (`t2i.load(precision="int8")`
    is the one over bf16 where the CPU has native bf16, else the one over fp32)."""
    from t2i.quantize import quantize_

    pipes = {p: t2i.load(precision=p) for p in ("fp32", "bf16")}
    for rest in ("fp32", "bf16"):
        pipe = t2i.load(precision=rest)
        quantize_(pipe.unet, t2i.has_vnni())
        pipes[f"int8+{rest}"] = pipe
    return pipes


def bench_unet(pipes: dict, repeats: int) -> None:
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.full((2,), 500.0), torch.randn(2, 32, 384)
    nets = {name: p._sampling_net() for name, p in pipes.items()}
    report("U-Net step, built-in model, batch 2 at 16x16",
           alternate({name: (lambda n=n: n(x, t, context=ctx)) for name, n in nets.items()}, repeats), base="fp32")


def bench_image(pipes: dict, repeats: int) -> None:
    report("whole generate, built-in model, 64x64, 20 steps, guidance",
           alternate({name: (lambda p=p: p.generate(PROMPT, seed=0)) for name, p in pipes.items()}, repeats),
           base="fp32")


def sd_variants() -> dict:
    import copy

    from t2i.nets.cast_inputs import CastInputs
    from t2i.nets.unet import UNET_CONFIGS, UNet
    from t2i.quantize import quantize_

    vnni = t2i.has_vnni()
    torch.manual_seed(0)
    fp32 = UNet(UNET_CONFIGS["sd15"]).eval().requires_grad_(False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    return {"fp32": fp32, "bf16": CastInputs(bf16), "int8+fp32": quantize_(copy.deepcopy(fp32), vnni),
            "int8+bf16": CastInputs(quantize_(bf16, vnni))}  # bf16 is quantized last: nothing else reads it


def bench_sd(repeats: int) -> None:
    nets = sd_variants()
    torch.manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.full((1,), 500.0), torch.randn(1, 77, 768)
    outs = {name: net(x, t, context=ctx).float() for name, net in nets.items()}
    for name, y in outs.items():
        print(f"    {name:<22} output error {(y - outs['fp32']).norm() / outs['fp32'].norm():.2e} of fp32's norm")
    report("SD 1.5 U-Net step, batch 1 at 32x32 latents",
           alternate({name: (lambda n=n: n(x, t, context=ctx)) for name, n in nets.items()}, repeats, warmup=False),
           base="fp32")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", nargs="+", default=["linear", "conv", "unet", "image", "sd"],
                    choices=["linear", "conv", "unet", "image", "sd"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {t2i.cpu_description()}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"load at start: {os.popen('uptime').read().strip()}")
    with torch.no_grad():
        if "linear" in args.parts:
            bench_linear(args.repeats)
        if "conv" in args.parts:
            bench_conv(args.repeats)
        if {"unet", "image"} & set(args.parts):
            pipes = pipelines()
            if "unet" in args.parts:
                bench_unet(pipes, args.repeats)
            if "image" in args.parts:
                bench_image(pipes, args.repeats)
        if "sd" in args.parts:
            bench_sd(args.repeats)
    print(f"load at end: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
