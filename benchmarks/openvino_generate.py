"""The OpenVINO side of the benchmark: the same job as `t2i generate` through optimum-intel's
OVStableDiffusionPipeline (SD 1.5 folder, DPM++ 2M, guidance, seed, one PNG), as a user of
OpenVINO would run it: exported to OpenVINO IR once, reshaped to the job's static shape, compiled.

    python benchmarks/openvino_generate.py PROMPT --model DIR --steps 20 --guidance 7.5 \
        --width 256 --height 256 --seed 0 --out x.png [--repeats 3] [--save-latents x.safetensors]

The IR export (minutes) is cached beside the folder (DIR + "_openvino", or "_openvino_int8" with
--int8: 8-bit weights by NNCF weight compression, as `optimum-cli export openvino --weight-format
int8` makes them) and timed apart from the process's own work. OpenVINO picks its own inference
precision by the CPU (bf16 where the CPU computes it natively). The process then loads and
compiles the IR, generates one image (the cold image), and `--repeats` more (warm images). The
last line printed is JSON with the seconds of each phase, for sd15_cpu.py. --save-latents writes
the final latents of the seed's image (`output_type="latent"`, diffusion scale, before decoding)
under `latents`.

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
    p.add_argument("--int8", action="store_true",
                   help="8-bit weights (NNCF weight compression at export, optimum-intel's load_in_8bit), cached "
                   "in DIR + '_openvino_int8'")
    p.add_argument("--scheduler", default="dpmpp_2m", choices=["dpmpp_2m", "euler"],
                   help="DPM++ 2M or Euler, on the folder's scheduler config")
    p.add_argument("--taesd", default=None,
                   help="decode with this AutoencoderTiny folder (its decoder converted to OpenVINO IR once, cached "
                   "in DIR + '_openvino', compiled for the job's shape) instead of the VAE")
    args = p.parse_args()
    start = time.perf_counter()
    import openvino as ov
    import torch
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    ir = Path(str(Path(args.model).resolve()) + ("_openvino_int8" if args.int8 else "_openvino"))
    export_s = 0.0
    if not (ir / "model_index.json").exists():
        t = time.perf_counter()
        exported = OVStableDiffusionPipeline.from_pretrained(args.model, export=True, compile=False,
                                                             load_in_8bit=args.int8)
        exported.save_pretrained(ir)
        del exported
        export_s = time.perf_counter() - t
    t_load = time.perf_counter()
    # OpenVINO runs its own thread pool: OMP_NUM_THREADS does not reach it, this property does
    ov_config = {"INFERENCE_NUM_THREADS": str(args.threads)} if args.threads else {}
    pipe = OVStableDiffusionPipeline.from_pretrained(ir, compile=False, ov_config=ov_config)
    scheduler = DPMSolverMultistepScheduler if args.scheduler == "dpmpp_2m" else EulerDiscreteScheduler
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=args.height, width=args.width, num_images_per_prompt=1)
    if args.guidance <= 1:  # no guidance: optimum-intel's reshape assumes a guided batch of 2 for the U-Net
        unet = pipe.unet.model
        shapes = {i: i.get_partial_shape() for i in unet.inputs}
        for i, shape in shapes.items():
            if i.get_any_name() in ("sample", "encoder_hidden_states"):
                shape[0] = 1
        unet.reshape(shapes)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    taesd = None
    if args.taesd:
        taesd_ir = Path(str(Path(args.taesd).resolve()) + "_openvino") / "decoder.xml"
        latent_shape = [1, 4, args.height // 8, args.width // 8]
        if not taesd_ir.exists():
            from diffusers import AutoencoderTiny

            tiny = AutoencoderTiny.from_pretrained(args.taesd).eval()
            ov.save_model(ov.convert_model(_Decode(tiny), example_input=torch.zeros(latent_shape)), taesd_ir)
        model = ov.Core().read_model(taesd_ir)
        model.reshape(latent_shape)
        taesd = ov.Core().compile_model(model, "CPU", ov_config)
    loaded = time.perf_counter()

    # The starting noise as diffusers draws it from the seed (optimum-intel draws its own otherwise),
    # so the final latents can be compared with t2i's and diffusers'.
    shape = (1, 4, args.height // 8, args.width // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(args.seed))

    def generate(output_type: str = "pil"):
        images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.width,
                      height=args.height, latents=noise, output_type="latent" if taesd else output_type).images
        if taesd is None or output_type == "latent":
            return images
        from PIL import Image

        decoded = torch.as_tensor(taesd(torch.as_tensor(images).numpy())[0])  # (1, 3, H, W) in [-1, 1]
        pixels = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return [Image.fromarray(pixels)]

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


def _Decode(tiny):  # noqa: N802 - a module factory, named like the module it makes
    """AutoencoderTiny's decode as a module of its own (latents -> image in [-1, 1]), for ov.convert_model."""
    import torch

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tiny = tiny

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.tiny.decode(latents).sample

    return Decode().eval()


if __name__ == "__main__":
    main()
