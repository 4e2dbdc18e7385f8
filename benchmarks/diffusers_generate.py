"""The diffusers side of the whole-command comparison: what a user would write with diffusers'
defaults for the job `t2i generate` does (SD 1.5 folder, DPM++ 2M, guidance, seed, one PNG).

    python benchmarks/diffusers_generate.py PROMPT --model DIR --steps 20 --guidance 7.5 \
        --width 256 --height 256 --seed 0 --out x.png --save-latents x.safetensors [--bf16]

--save-latents writes the final latents (diffusion scale, before decoding) under `latents`, as
`t2i generate --save-latents` does. --scheduler euler and --taesd DIR give the few-step job (SD-Turbo
style, `turbo_cpu.py`). --bf16 casts every module to bf16 (the fairness yardstick
for reduced precision). Imported by nothing: a benchmark peer, not part of t2i.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="diffusers.png")
    p.add_argument("--save-latents", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--scheduler", default="dpmpp_2m", choices=["dpmpp_2m", "euler"],
                   help="DPM++ 2M (DPMSolverMultistepScheduler) or Euler (EulerDiscreteScheduler), on the folder's "
                   "scheduler config")
    p.add_argument("--taesd", default=None, help="decode with this AutoencoderTiny folder instead of the VAE")
    args = p.parse_args()
    start = time.perf_counter()
    import torch
    from diffusers import AutoencoderTiny, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    dtype = torch.bfloat16 if args.bf16 else None
    extra = {"vae": AutoencoderTiny.from_pretrained(args.taesd, torch_dtype=dtype)} if args.taesd else {}
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, local_files_only=True,
                                                   torch_dtype=dtype, **extra)
    scheduler = DPMSolverMultistepScheduler if args.scheduler == "dpmpp_2m" else EulerDiscreteScheduler
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.width,
                 height=args.height, generator=torch.Generator("cpu").manual_seed(args.seed),
                 callback_on_step_end=keep_latents).images[0]
    image.save(args.out)
    if args.save_latents:
        save_file({"latents": final["latents"].float().contiguous()}, args.save_latents)
    end = time.perf_counter()
    print(f"diffusers: load {loaded - start:.1f} s, generate {end - loaded:.1f} s")


if __name__ == "__main__":
    main()
