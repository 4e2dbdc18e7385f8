"""The OpenVINO side of the benchmark: the same job as `t2i generate` through optimum-intel's
OVStableDiffusionPipeline (SD 1.5 folder, DPM++ 2M, guidance, seed, one PNG), as a user of
OpenVINO would run it: exported to OpenVINO IR once, reshaped to the job's static shape, compiled.

    python benchmarks/openvino_generate.py PROMPT --model DIR --steps 20 --guidance 7.5 \
        --width 256 --height 256 --seed 0 --out x.png [--repeats 3] [--save-latents x.safetensors]

The IR export (minutes) is cached beside the folder (DIR + "_openvino") and timed apart from the
process's own work. The process then loads and compiles the IR, generates one image (the cold
image), and `--repeats` more (warm images). The last line printed is JSON with the seconds of
each phase, for sd15_cpu.py. --save-latents writes the final latents of the seed's image
(`output_type="latent"`, diffusion scale, before decoding) under `latents`.

optimum-intel pins its own transformers and huggingface-hub versions, so it usually lives in an
environment of its own; sd15_cpu.py --openvino-python points at that environment's python. Imported
by nothing: a benchmark peer, not part of t2i.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="the diffusers folder (exported to IR on first use)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=0, help="warm images after the first one")
    p.add_argument("--out", default="openvino.png")
    p.add_argument("--save-latents", default=None)
    p.add_argument("--threads", type=int, default=None, help="OpenVINO's INFERENCE_NUM_THREADS (default: its own)")
    args = p.parse_args()
    start = time.perf_counter()
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from optimum.intel import OVStableDiffusionPipeline

    ir = Path(str(Path(args.model).resolve()) + "_openvino")
    export_s = 0.0
    if not (ir / "model_index.json").exists():
        t = time.perf_counter()
        exported = OVStableDiffusionPipeline.from_pretrained(args.model, export=True, compile=False)
        exported.save_pretrained(ir)
        del exported
        export_s = time.perf_counter() - t
    t_load = time.perf_counter()
    # OpenVINO runs its own thread pool: OMP_NUM_THREADS does not reach it, this property does
    ov_config = {"INFERENCE_NUM_THREADS": str(args.threads)} if args.threads else {}
    pipe = OVStableDiffusionPipeline.from_pretrained(ir, compile=False, ov_config=ov_config)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=args.height, width=args.width, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    # The starting noise as diffusers draws it from the seed (optimum-intel draws its own otherwise),
    # so the final latents can be compared with t2i's and diffusers'.
    shape = (1, 4, args.height // 8, args.width // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(args.seed))

    def generate(output_type: str = "pil"):
        return pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.width,
                    height=args.height, latents=noise, output_type=output_type).images

    generate()[0].save(args.out)
    first = time.perf_counter()
    warm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        generate()
        warm.append(time.perf_counter() - t)
    if args.save_latents:
        from safetensors.torch import save_file

        latents = torch.as_tensor(generate("latent")).float().contiguous()
        save_file({"latents": latents}, args.save_latents)
    print(json.dumps({"export_s": export_s, "import_s": t_load - start - export_s, "load_compile_s": loaded - t_load,
                      "first_image_s": first - loaded, "warm_image_s": statistics.median(warm) if warm else None,
                      "process_s": first - start - export_s}))


if __name__ == "__main__":
    main()
