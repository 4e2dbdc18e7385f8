"""Peak memory of compact weights (t2i.compact) and of `auto` against float32, each configuration a whole process.

    python benchmarks/compact_memory.py                       # SD 1.5 architecture, 256x256
    python benchmarks/compact_memory.py --skip-sd15 --sdxl    # the SDXL architecture at 1024x1024 (heavy:
                                                              # ~27 min on 2 shared Zen 4 cores)
    python benchmarks/compact_memory.py --skip-sd15 --sdxl --sdxl-size 256 --steps 1   # a quick check of the path

The job: 4 steps of Euler without guidance (guidance 1: the U-Net runs on a batch of 1), seed 0,
VAE decode, as `t2i.systems.stable_diffusion.load(folder, compact=...)` then `pipe.generate(...)` in a
fresh Python process per configuration. Each child reports its peak RSS (getrusage) after loading,
before the VAE decode and at the end, and the seconds of each; the table prints ratios against
float32 from the same run, and the CPU from /proc/cpuinfo. The decode's activations (the SD VAE at
1024x1024: 3.2 GB) set the SDXL peak; t2i has no tiled decode yet.

The models are the real architectures with random weights, written once under /tmp by this script
(nothing is downloaded): SD 1.5 in float32 (as runwayml's files), by `sd15_folder.py`; SDXL in
float16 (as stabilityai's fp16 variant), streamed tensor by tensor from networks built on the meta
device through t2i's own exporter, so writing it never holds the model in memory. SDXL in float32
needs about 14 GB for its weights alone: it runs only with --sdxl-fp32 (a machine with room for
it); otherwise its float32 row gives the weight bytes, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # t2i from this checkout, whichever the current folder
from sd15_folder import DEFAULT_FOLDER as SD15_FOLDER  # noqa: E402
from sd15_folder import build_sd15_folder  # noqa: E402

SDXL_FOLDER = Path("/tmp/t2i_bench_sdxl_fp16")
PROMPT = "a photograph of an astronaut riding a horse"
# compact: bf16 storage (a float16 file stays float16); auto: `t2i.load`'s default for this CPU and model
# (int8 U-Net layers and bf16 elsewhere on a CPU with native bf16 and VNNI)
CONFIGS = {"fp32": None, "compact": torch.bfloat16, "auto": None}

# SDXL base 1.0's component configs (stabilityai/stable-diffusion-xl-base-1.0), written out.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.13025,
)
SDXL_TEXT = (
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         max_position_embeddings=77, hidden_act="quick_gelu", architectures=["CLIPTextModel"]),
    dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
         architectures=["CLIPTextModelWithProjection"]),
)


def random_weights(dtype: torch.dtype, seed: int = 0):
    """A `save_diffusers_folder` writer that streams random weights of `dtype` for the (meta) tensors
    it is given, one at a time: N(0, 1/fan_in) for matrices and kernels, ones for norm scales, zeros
    for biases (values keep activations of a deep random network in range)."""
    g = torch.Generator().manual_seed(seed)
    code = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]

    def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) >= 2:
            return (torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))).to(dtype)
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)

    def save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
        header, offset = {}, 0
        for name, t in state.items():
            n = t.numel() * dtype.itemsize
            header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps({"__metadata__": metadata, **header}).encode()
        raw += b" " * (-len(raw) % 8)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, t in state.items():
                f.write(value(name, tuple(t.shape)).view(torch.uint8).numpy().tobytes())

    return save


def build_sdxl_folder(folder: Path = SDXL_FOLDER) -> Path:
    """The random float16 SDXL folder (about 7 GB) unless it is already complete."""
    if (folder / "model_index.json").is_file():
        return folder
    from t2i.autoencoders.kl import AutoencoderKL
    from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
    from t2i.checkpoints.export import save_diffusers_folder
    from t2i.checkpoints.parts import LatentDiffusionParts
    from t2i.checkpoints.single_file_config import default_schedule
    from t2i.checkpoints.transformers_text import clip_config_from_transformers
    from t2i.nets.unet import UNet
    from t2i.text.clip import CLIPTextModel
    from t2i.text.clip_tokenizer import CLIPTokenizer
    from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder

    with torch.device("meta"):
        unet = UNet(unet_config_from_diffusers(SDXL_UNET))
        vae = AutoencoderKL(vae_config_from_diffusers(SDXL_VAE))
        towers = [CLIPTextModel(clip_config_from_transformers(d)) for d in SDXL_TEXT]
    text = SDXLTextEncoder([CLIPTextEncoder(CLIPTokenizer.default(), towers[0], "penultimate"),
                            CLIPTextEncoder(CLIPTokenizer.default("!"), towers[1], "penultimate", "text_embeds")])
    parts = LatentDiffusionParts(unet, vae, text, default_schedule("epsilon"), folder.name, "sdxl",
                                 "EulerDiscreteScheduler", zero_empty_negative=True)
    return save_diffusers_folder(parts, folder, save=random_weights(torch.float16))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(config: str, folder: Path, size: int, threads: int, steps: int) -> None:
    """One configuration in this process: load, generate, print one JSON line."""
    import t2i
    from t2i.checkpoints.parts import text_towers
    from t2i.compact import parameter_bytes
    from t2i.quantize import int8_layers
    from t2i.systems import stable_diffusion as sd

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if config == "auto":
        pipe = t2i.load(folder, precision="auto")
    else:
        pipe = sd.load(folder, torch.float32, compact=CONFIGS[config])
    loaded, load_rss = time.perf_counter() - t0, peak_rss_gb()
    nets = [pipe.unet, pipe.vae, *(t.model for t in text_towers(pipe.text_encoder))]
    marks, decode = {}, pipe.vae.decode

    def decode_marked(*args, **kwargs):  # the peak so far, before the decoder's activations join it
        marks.setdefault("sampling_s", time.perf_counter() - t0)
        marks.setdefault("before_decode_rss_gb", peak_rss_gb())
        print(f"{config}: loaded {load_rss:.2f} GB in {loaded:.0f} s; sampled, peak {peak_rss_gb():.2f} GB, "
              f"in {marks['sampling_s']:.0f} s; decoding", file=sys.stderr, flush=True)
        return decode(*args, **kwargs)

    pipe.vae.decode = decode_marked
    t0 = time.perf_counter()
    result = pipe.generate(PROMPT, seed=0, steps=steps, guidance=1.0, sampler="euler", width=size, height=size)
    print(json.dumps(dict(config=config, steps=steps, load_s=loaded, load_rss_gb=load_rss, **marks,
                          generate_s=time.perf_counter() - t0, peak_rss_gb=peak_rss_gb(),
                          weights_gb=sum(parameter_bytes(n) + sum(m.packed.numel() for m in int8_layers(n))
                                         for n in nets) / 2**30,
                          finite=bool(torch.isfinite(result.latents).all()))), flush=True)


def weight_gb(folder: Path, itemsize: int) -> float:
    """The weights of a folder at `itemsize` bytes per element (from the safetensors headers)."""
    from t2i.checkpoints.io import check_safetensors_header

    numel = sum(math.prod(v["shape"]) for f in folder.rglob("*.safetensors")
                for k, v in check_safetensors_header(f).items() if k != "__metadata__")
    return numel * itemsize / 2**30


def run(model: str, folder: Path, size: int, threads: int, steps: int, configs: list[str]) -> list[dict]:
    rows = []
    for config in configs:
        cmd = [sys.executable, __file__, "--child", config, str(folder), str(size), "--threads", str(threads),
               "--steps", str(steps)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress, errors) passes through
        if out.returncode != 0:
            print(f"{model} {config}: failed ({out.returncode})", flush=True)
            continue
        rows.append({"model": model, "size": size, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], fp32_weights: dict[str, float]) -> str:
    lines = ["| model, size, steps | weights | weight GB | load s | peak RSS after load GB | sampling s "
             "| peak RSS before decode GB | generate s | peak RSS GB | peak / fp32's |", "|---" * 10 + "|"]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["config"] == "fp32"), None)
        ratio = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}" if base else "(fp32 not run)"
        lines.append(f"| {r['model']}, {r['size']}x{r['size']}, {r['steps']} | {r['config']} | {r['weights_gb']:.2f} "
                     f"| {r['load_s']:.0f} | {r['load_rss_gb']:.2f} | {r['sampling_s']:.0f} "
                     f"| {r['before_decode_rss_gb']:.2f} | {r['generate_s']:.0f} | {r['peak_rss_gb']:.2f} | {ratio} |")
    for model, gb in fp32_weights.items():
        lines.append(f"| {model} | fp32 (not run: its weight bytes only) | {gb:.2f} |" + " |" * 7)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "FOLDER", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="SD 1.5 image size")
    p.add_argument("--sdxl-size", type=int, default=1024, help="SDXL image size (smaller: a quick check of the path)")
    p.add_argument("--sdxl", action="store_true", help="also the SDXL architecture at 1024x1024, compact and auto")
    p.add_argument("--sdxl-fp32", action="store_true", help="and SDXL in float32 too (about 14 GB of weights)")
    p.add_argument("--skip-sd15", action="store_true")
    p.add_argument("--sdxl-configs", default="compact,auto",
                   help="the SDXL configurations to run (without --sdxl-fp32)")
    args = p.parse_args()
    if args.child:
        config, folder, size = args.child
        return child(config, Path(folder), int(size), args.threads, args.steps)
    import t2i

    print(f"CPU: {t2i.cpu_description()}; torch {torch.__version__}; {args.threads} threads", flush=True)
    rows, fp32_only = [], {}
    if not args.skip_sd15:
        rows += run("SD 1.5", build_sd15_folder(SD15_FOLDER), args.size, args.threads, args.steps, list(CONFIGS))
    if args.sdxl:
        folder = build_sdxl_folder()
        rows += run("SDXL", folder, args.sdxl_size, args.threads, args.steps,
                    list(CONFIGS) if args.sdxl_fp32 else args.sdxl_configs.split(","))
        if not args.sdxl_fp32:
            fp32_only["SDXL"] = weight_gb(folder, 4)
    print(table(rows, fp32_only))


if __name__ == "__main__":
    main()
