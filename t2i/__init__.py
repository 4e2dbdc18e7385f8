"""t2i: text-to-image systems in plain PyTorch.

    import t2i
    pipe = t2i.load()                      # the built-in shapes model
    images = pipe("a red circle above a blue square", seed=1)
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "default"

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo).

    Without them PyTorch emulates bf16 matmuls and convolutions, which is far slower than fp32
    (measured on an AVX2-only Zen 3: a 2048x2048 matmul ran at 0.1 GFLOP/s in bf16 against
    40 in fp32), so `precision="auto"` must not pick bf16 there. cpuinfo: the text to read
    instead of /proc/cpuinfo (tests).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """"auto" -> "bf16" where the CPU has native bf16, else "fp32"; "fp32"/"bf16" are kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def load(path: str | Path | None = None, precision: str = "fp32"):
    """Load a model for generation: a diffusers folder, a single-file SD checkpoint (.safetensors,
    .ckpt), or t2i's built-in model when path is None.

    precision: "fp32", "bf16" (weights and compute; the samplers stay float32), or "auto": bf16
    only where the CPU computes it natively (`native_bf16`), fp32 elsewhere.

    Returns a pipeline: `pipe(prompt, seed=..., steps=...) -> list[PIL.Image]`, and
    `pipe.generate(...)` for the latents and metadata too.
    """
    import torch

    from t2i.checkpoints.diffusers_folder import is_diffusers_folder, load_diffusers_pipeline

    dtype = torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32
    if path is None:
        from t2i.systems.shapes_ldm import load_default_model

        return load_default_model(dtype=dtype)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if is_diffusers_folder(path):
        return load_diffusers_pipeline(path, dtype=dtype)
    from t2i.systems.shapes_ldm import is_t2i_model, load_t2i_model

    if is_t2i_model(path):
        return load_t2i_model(path, dtype=dtype)
    if path.is_dir():
        raise ValueError(f"{path}: not a model folder (no model_index.json, no t2i model.safetensors)")
    from t2i.checkpoints.single_file import is_single_file, load_single_file

    if is_single_file(path):
        return load_single_file(path, dtype=dtype)
    raise ValueError(f"{path}: not a model (expected a diffusers folder, a t2i model folder, "
                     "or a .safetensors/.ckpt single file)")
