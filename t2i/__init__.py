"""t2i: text-to-image systems in plain PyTorch.

    import t2i
    pipe = t2i.load()                      # the built-in shapes model
    images = pipe("a red circle above a blue square", seed=1)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__version__ = "0.1.0"

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "default"

PRECISIONS = ("auto", "fp32", "bf16", "int8", "compact")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of a /proc/cpuinfo text (None: this machine's; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))


def cpu_description(cpuinfo: str | None = None) -> str:
    """One line naming a CPU for benchmark reports, from the first processor of a /proc/cpuinfo text
    (None: this machine's; platform's guess where it cannot be read), e.g.
    'AMD EPYC (family 25 model 1 stepping 1), flags avx2'. The flags listed are the ones t2i's speed
    choices turn on (auto_precision), so two reports from different machines say why they differ."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            import platform

            return platform.processor() or platform.machine() or "unknown CPU"
    field: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    wanted = sorted(cpu_flags(cpuinfo) & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                          "amx_int8"})
    return (f"{field.get('model name', 'unknown CPU')} (family {field.get('cpu family', '?')} model "
            f"{field.get('model', '?')} stepping {field.get('stepping', '?')}), flags {' '.join(wanted) or 'none'}")


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo).

    Without them PyTorch emulates bf16 matmuls and convolutions, which is far slower than fp32
    (measured on an AVX2-only Zen 3: a 2048x2048 matmul ran at 0.1 GFLOP/s in bf16 against
    40 in fp32), so `precision="auto"` must not pick bf16 there. cpuinfo: the text to read
    instead of /proc/cpuinfo (tests).
    """
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has int8 dot products accumulating in int32 (AVX512-VNNI, AVX-VNNI or
    AMX-INT8): int8 weights may then use all 8 bits (t2i.quantize)."""
    return bool(cpu_flags(cpuinfo) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_int8_kernels(cpuinfo: str | None = None) -> bool:
    """Whether oneDNN has vectorised int8 kernels for this CPU: AVX2 (u8 x s8 pairs summed in int16)
    or better. (An empty flag list, where /proc/cpuinfo cannot be read, counts as no.)"""
    return bool(cpu_flags(cpuinfo) & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


# Models with fewer weight bytes than this stay fp32 under "auto": per-layer overheads, not the
# matmuls, dominate them (the 21.7 MB built-in model's 64x64 image took 1.17 of fp32's time in bf16
# and 1.26 in int8 on the Zen 4 below, and lost 2.0-2.3 judge points).
SMALL_MODEL_BYTES = 200_000_000


def auto_precision(cpuinfo: str | None = None, model_bytes: int | None = None, quantizable: bool = True) -> str:
    """What `precision="auto"` becomes on a CPU (cpuinfo: a /proc/cpuinfo text; None: this one's)
    for a model of `model_bytes` weight bytes (None: unknown, taken as large):

        a model under SMALL_MODEL_BYTES -> "fp32"
        native bf16 and VNNI -> "int8" (int8 U-Net Linears and 3x3 convolutions, the rest bf16)
        native bf16 only     -> "bf16"
        int8 kernels (AVX2 or better), no native bf16 -> "int8" (the same int8 layers, the rest float32)
        otherwise            -> "fp32"
        quantizable=False (LoRAs are merged into the model): "bf16" where int8 would be picked
        with native bf16, else "fp32"

    Measured on an AMD EPYC Zen 4 (family 25 model 17, AVX512-BF16 and AVX512-VNNI), one thread,
    one SD 1.5 U-Net step at 32x32 latents (session 6, int8 Linears only): bf16 0.57 of fp32's
    time, int8 Linears with bf16 elsewhere 0.46 (0.81 of bf16's). Session 14, same CPU, one thread,
    one guided step at 64x64 latents (512x512 images), in one run: bf16 11.0 s, int8 Linears 10.1 s,
    int8 Linears and 3x3 convolutions 9.1 s (t2i.quantize); with two threads 4.4 s. On an AMD EPYC
    Zen 3 (family 25 model 1, AVX2 only: no bf16, no VNNI; session 15), two threads, one guided step
    at 64x64 latents, four alternated rounds: fp32 median 19.0 s, int8 with float32 elsewhere 12.5 s
    (0.66); per layer, one thread, int8 3x3 convolutions 0.25-0.74 of fp32 and Linears 0.48-1.09.
    AVX-512 CPUs without bf16 (Skylake-SP, Cascade Lake) were not measured; oneDNN's int8 kernels
    there are wider than AVX2's. Quality, the judge on the built-in model (300 held-out prompts): Zen 4: fp32 0.337,
    bf16 0.313, int8 with bf16 elsewhere 0.317, int8 with float32 elsewhere 0.340 (the plain model;
    the layout model: fp32 0.900, int8 0.903); on a tiny random SD the int8 images are 31-37 dB PSNR
    from fp32's. The built-in model itself is too small to gain: its 64x64 image takes 1.17 of fp32's
    time in bf16 and 1.26 in int8 (per-layer overheads dominate a 4.7 M-parameter U-Net).
    """
    if model_bytes is not None and model_bytes < SMALL_MODEL_BYTES:
        return "fp32"
    if native_bf16(cpuinfo):
        return "int8" if has_vnni(cpuinfo) and quantizable else "bf16"
    return "int8" if has_int8_kernels(cpuinfo) and quantizable else "fp32"


def weight_bytes(path: Path) -> int:
    """The bytes of the weight files of a model file or folder on disk."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin", ".ckpt")]
    return sum(f.stat().st_size for f in files)


def model_bytes(model: str | Path | None) -> int:
    """The bytes of a model's weight files on disk (a shipped name, a path, or None: the default)."""
    from t2i.systems.registry import resolve

    return weight_bytes(resolve(model)[1])


def resolve_precision(precision: str, model: str | Path | None = None, quantizable: bool = True,
                      size: Callable[[], int] | None = None) -> str:
    """"auto" -> `auto_precision` for this CPU and the size of `model` (a name or path; None: the
    default model; `size` gives it where the caller has already found the model); "fp32", "bf16"
    "int8" and "compact" are kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return auto_precision(model_bytes=size() if size else model_bytes(model), quantizable=quantizable)


def load(model: str | Path | None = None, precision: str = "fp32", quantizable: bool = True):
    """Load a model for generation: the name of a shipped model (`t2i models` lists them), a path
    any registered family recognises (a diffusers folder, a single-file SD checkpoint, a t2i model
    file...), or the built-in default model when model is None.

    precision: "fp32"; "bf16" (weights and compute; the samplers stay float32); "int8" (the U-Net's
    Linear layers and k x k convolutions int8 with dynamic int8 activations, `t2i.quantize`; everything else bf16 where
    the CPU computes bf16 natively, else float32); "compact" (Stable Diffusion: weights read straight
    into bf16 storage, fp16 files kept fp16, widened layer by layer to float32 compute, `t2i.compact`:
    about half the memory, float32's results on the rounded weights); or "auto": `auto_precision` for this CPU and
    this model's size. quantizable=False keeps "auto" off int8 (a model that LoRAs will be merged into).

    Returns a Pipeline (t2i.systems.base): `pipe(prompt, seed=..., steps=...) -> list[PIL.Image]`,
    `pipe.generate(...)` for the final sample and metadata too, `pipe.run(GenerationRequest(...))`.
    """
    import torch

    from t2i.systems.registry import resolve

    family, path = resolve(model)  # once: its size decides "auto", then its family loads it
    resolved = resolve_precision(precision, quantizable=quantizable, size=lambda: weight_bytes(path))
    if resolved == "compact":
        if family.name != "stable_diffusion":
            raise ValueError(f"precision compact loads Stable Diffusion models; {path} is {family.name}: use fp32, "
                             "bf16 or int8")
        return family.load(path, torch.float32, compact=torch.bfloat16)
    rest_bf16 = resolved == "bf16" or (resolved == "int8" and native_bf16())
    pipe = family.load(path, torch.bfloat16 if rest_bf16 else torch.float32)
    shipped = family.shipped_at(path)
    if shipped is not None:  # PNG metadata and the server say "t2i-shapes", not the folder the file sits in
        pipe.name = shipped.name
    if resolved == "int8":
        from t2i.quantize import quantize_

        if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
            raise ValueError(f"precision int8 quantizes a U-Net, which {pipe.name} ({pipe.family}) does not have; "
                             "use fp32 or bf16")

        quantize_(pipe.unet, has_vnni())  # the text encoder stays float: see t2i.quantize
    return pipe
