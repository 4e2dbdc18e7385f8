"""Few-step distillation of t2i's latent diffusion models (issue 20): `t2i distill lcm|add`.

- `t2i.distill.lcm`: latent consistency distillation (LCM, Algorithm 1 of Luo et al. 2023) and LCM-LoRA;
- `t2i.distill.add`: adversarial diffusion distillation (ADD, Sauer et al. 2023: SDXL-Turbo);
- `t2i.distill.teacher`: the teacher (a shapes_ldm or shapes_layout model) and how its student ships.

A run writes `RUN/model.safetensors`, a normal model of the teacher's family (the same loader, the
teacher's planner beside it for a layout model) whose defaults are the fast setting (sampler `lcm`,
4 steps, guidance embedded or 1), so `t2i generate --model RUN` draws with it.

The fast variant of a model: a distilled student shipped next to it as `model.fast.safetensors` (beside
the model's `model.safetensors`, or `NAME.fast.safetensors` beside a file `NAME.safetensors`); or, for a
model whose own defaults already are few-step consistency sampling (sampler `lcm`, as the built-in model's:
4 steps without guidance, within 2 points of its 20-step guided score, while its distilled students scored
lower at 2-8 steps; docs/FAMILIES.md), the model itself. `t2i generate --fast` and `load_fast` use it
(`resolve_fast`); `fast_model_file` finds the student.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

FAST_SUFFIX = ".fast.safetensors"


def fast_model_file(model: str | Path | None) -> Path:
    """The distilled student shipped beside `model` (a shipped model's name, a path, None: the default
    model), or `model` itself when it is one. FileNotFoundError naming the expected file and how to make
    it when there is none."""
    from t2i.checkpoints.io import system_file
    from t2i.systems.registry import resolve

    system, path = resolve(model)
    file = system_file(path)
    if file.name.endswith(FAST_SUFFIX):
        return file
    fast = file.with_name(file.name.removesuffix(".safetensors") + FAST_SUFFIX)
    if not fast.is_file() or not system.detect(fast):
        raise FileNotFoundError(f"--fast: no distilled student beside {path} (expected {fast}, a {system.name} "
                                f"model). Make one with `t2i distill lcm --teacher {model or path} --out RUN` and "
                                f"copy RUN/model.safetensors to {fast}")
    return fast


def resolve_fast(model: str | Path | None, load: Callable[[str | Path | None], Any]) -> Any:
    """The fast variant of `model`, loaded by `load`: the distilled student beside it when there is one, else
    the model itself when its defaults already sample with `lcm`; else `fast_model_file`'s FileNotFoundError."""
    try:
        fast = fast_model_file(model)
    except FileNotFoundError:
        pipe = load(model)
        if pipe.defaults.sampler == "lcm":
            return pipe
        raise
    return load(fast)  # outside the try: a student that fails to load says so, never falls back in silence


def load_fast(model: str | Path | None = None, precision: str = "fp32"):
    """`t2i.load` of the fast variant of `model` (see `resolve_fast`)."""
    import t2i

    return resolve_fast(model, lambda m: t2i.load(m, precision=precision))
