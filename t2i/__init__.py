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


def load(model: str | Path | None = None, precision: str = "fp32"):
    """Load a model for generation: the name of a shipped model (`t2i models` lists them), a path
    any registered family recognises (a diffusers folder, a single-file SD checkpoint, a t2i model
    file...), or the built-in default model when model is None.

    precision: "fp32", "bf16" (weights and compute; the samplers stay float32), or "auto": bf16
    only where the CPU computes it natively (`native_bf16`), fp32 elsewhere.

    Returns a Pipeline (t2i.systems.base): `pipe(prompt, seed=..., steps=...) -> list[PIL.Image]`,
    `pipe.generate(...)` for the final sample and metadata too, `pipe.run(GenerationRequest(...))`.
    """
    import torch

    from t2i.systems.registry import load as load_registered

    dtype = torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32
    return load_registered(model, dtype)
