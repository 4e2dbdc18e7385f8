"""Peak memory of one full fine-tuning step of the SD 1.5 U-Net on the CPU (issue 21), with and without
gradient checkpointing and bf16 autocast.

Each setting runs in its own process (peak RSS, `ru_maxrss`, is per process): the SD 1.5 U-Net
(`UNET_CONFIGS["sd15"]`, 860M parameters, random weights) in float32, one step of batch 1 at --size
pixels (latents size / 8) with a 77-token context, the MSE of its output against a random target,
backward, and an optimizer step. Settings:
- fp32: plain autograd.
- ckpt: gradient checkpointing (`t2i.nets.grad_checkpoint.enable_gradient_checkpointing`, as `t2i train
  finetune --gradient-checkpointing`: torch.utils.checkpoint, non-reentrant, around every ResBlock and
  SpatialTransformer): their activations are recomputed in the backward pass instead of kept.
- bf16: the forward under `torch.autocast("cpu", torch.bfloat16)` (float32 master weights and grads);
  only where the CPU computes bf16 natively (avx512_bf16 / amx_bf16), else it is emulated and slow.
- bf16+ckpt: both.
The optimizer is plain SGD by default, so the measurement is weights + gradients + activations; AdamW
adds its two float32 moments (8 bytes a parameter, 6.9 GB here): `--optimizer adamw` measures it too
(needs about 7 GB more memory than the SGD run).

    python benchmarks/sd_finetune_memory.py --size 256 --threads 1

prints one line per setting and the ratios of peak RSS and step time to fp32's.

Measured 2026-11-30 (2 cores shared with two training jobs, so the step times are not comparable; SGD;
860M parameters: weights 3.75 GB of RSS after the build, gradients 3.44 GB):
| size | fp32 | ckpt | bf16 | bf16+ckpt |
| --- | --- | --- | --- | --- |
| 256 | 7.55 GB | 7.41 GB (0.98) | 7.92 GB (1.05) | 7.59 GB (1.01) |
| 512 | 8.59 GB | 7.88 GB (0.92) | - | 7.78 GB (0.91) |
Above weights + gradients, the activations of one 512x512 sample are only ~1.4 GB (the attention keeps
no (N, N) maps), so checkpointing halves them (0.69 GB) and bf16 autocast takes a little more off, but
the peak stays ruled by weights, gradients and (with AdamW) its 6.9 GB of moments: a CPU fine-tune of SD
1.5 wants ~15.5 GB with AdamW; the savings that matter there are 8-bit/factored optimizer states or
training a LoRA instead. At 256 px bf16 autocast costs more than it saves (its bf16 weight copies).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # t2i from this clone, installed or not

SETTINGS = ("fp32", "ckpt", "bf16", "bf16+ckpt")


def rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def one(setting: str, size: int, optimizer: str, threads: int) -> dict:
    """One fine-tuning step in this process; the measurements as a dict."""
    import torch

    from t2i.nets.grad_checkpoint import enable_gradient_checkpointing
    from t2i.nets.unet import UNET_CONFIGS, UNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet(UNET_CONFIGS["sd15"]).train()
    params = sum(p.numel() for p in unet.parameters())
    wrapped = enable_gradient_checkpointing(unet) if "ckpt" in setting else 0
    opt = (torch.optim.AdamW(unet.parameters(), lr=1e-5) if optimizer == "adamw"
           else torch.optim.SGD(unet.parameters(), lr=1e-5))
    weights_gb = rss_gb()
    h = size // 8
    x, target = torch.randn(1, 4, h, h), torch.randn(1, 4, h, h)  # (B, 4, h, w) latents and target
    context, t = torch.randn(1, 77, 768), torch.tensor([500.0])  # (B, T, D) CLIP states
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in setting):
        out = unet(x, t, context)  # (B, 4, h, w)
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"setting": setting, "size": size, "optimizer": optimizer, "params_M": round(params / 1e6, 1),
            "checkpointed_blocks": wrapped, "rss_after_build_GB": round(weights_gb, 2),
            "peak_rss_GB": round(rss_gb(), 2), "step_s": round(seconds, 1), "loss": round(loss.item(), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process's setting
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.optimizer, args.threads)))
        return
    from t2i import native_bf16

    results = {}
    for setting in args.settings.split(","):
        if "bf16" in setting and not native_bf16():
            print(f"{setting}: skipped (no native bf16 on this CPU: emulated bf16 is far slower than fp32)")
            continue
        cmd = [sys.executable, __file__, "--one", setting, "--size", str(args.size), "--optimizer", args.optimizer,
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[setting]), flush=True)
    base = results.get("fp32")
    if base:
        base_above = base["peak_rss_GB"] - base["rss_after_build_GB"]
        for setting, r in results.items():
            above = r["peak_rss_GB"] - r["rss_after_build_GB"]  # gradients, activations, optimizer state
            print(f"{setting:10s} peak RSS {r['peak_rss_GB']:6.2f} GB ({r['peak_rss_GB'] / base['peak_rss_GB']:.2f} "
                  f"of fp32), above the weights {above:5.2f} GB ({above / base_above:.2f}), "
                  f"step {r['step_s']:6.1f} s ({r['step_s'] / base['step_s']:.2f})")


if __name__ == "__main__":
    main()
