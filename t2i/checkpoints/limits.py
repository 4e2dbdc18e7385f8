"""Checks that stand between a config read from a file and the memory it would make us allocate.

A config is data from a download: a 2 KB file whose config asks for a billion channels, ten
million layers or 1e9 training timesteps must be refused in milliseconds, not after building a
network or a schedule of that size. A loader therefore

1. checks the config's numbers against sane bounds (`check_config`, `check_schedule`): every
   size at least 1 (nothing divides by zero), at most far beyond any released model, floats finite;
   and no more blocks than the file has tensors (each block holds several);
2. builds the network on the meta device (no memory) and compares its parameter names and shapes
   with the tensors actually present (`check_shapes`, against a checkpoint's `header_tensors`,
   before any weight is read);
3. only then reads the weights and assigns them (`load_state_dict(..., assign=True)`).

`build_checked` does 1 and 2 for any module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from t2i.checkpoints.io import (
    CheckpointError,
    check_safetensors_header,
    header_tensors,
    load_state_dict,
    on_meta_device,
    read_config,
)

WIDE = 1 << 16  # channels, widths, embedding sizes (released SD models: at most 5120)
# Per field name, (lowest, highest) allowed value; a per-level tuple is checked element-wise.
# Fields not listed here must still be non-negative integers of at most WIDE.
BOUNDS: dict[str, tuple[int, int]] = {
    "layers_per_block": (1, 16),
    "transformer_depth": (1, 64),
    "num_heads": (1, 1024),
    "heads": (1, 1024),
    "norm_groups": (1, 1024),
    "layers": (1, 256),
    "vocab_size": (1, 1 << 20),
    "eos_token_id": (0, 1 << 20),
    "pad_token_id": (0, 1 << 20),
    "sample_size": (1, 1 << 14),
    "max_positions": (1, WIDE),
    "num_train_timesteps": (1, 100_000),
    "steps_offset": (0, 100_000),
}
WIDTHS = frozenset({"in_channels", "out_channels", "latent_channels", "block_channels", "context_dim", "width",
                    "mlp_dim", "projection_dim", "time_embed_dim", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim"})
MAX_LEVELS = 8


def _bad(what: str, message: str) -> CheckpointError:
    return CheckpointError(f"{what}: {message}")


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(name: str, value: Any, like: Any, what: str) -> None:
    """`value` must be of the kind of the field's default `like` (a bool or a string, or None; a
    number; anything if the default is None), and a number finite and, for an int, within BOUNDS."""
    if isinstance(like, bool) or isinstance(like, str):
        if value is not None and type(value) is not type(like):
            raise _bad(what, f"{name}={value!r} is not a {type(like).__name__}")
        return
    if like is None and (value is None or isinstance(value, (bool, str))):
        return
    if not _real(value):
        raise _bad(what, f"{name}={value!r} is not a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(what, f"{name}={value!r} is not a finite number")
        return
    low, high = BOUNDS.get(name, (1, WIDE) if name in WIDTHS else (0, WIDE))
    if not low <= value <= high:
        raise _bad(what, f"{name}={value} is outside the supported range {low}..{high}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _check_fields(cfg: Any, what: str, levels: int | None = None) -> None:
    """Every field against the kind of its default; per-level tuples element-wise, `levels` long."""
    for f in dataclasses.fields(cfg):
        value, like = getattr(cfg, f.name), _default(f)
        if isinstance(like, (tuple, list)) and like:
            if not isinstance(value, (tuple, list)) or (levels is not None and len(value) != levels):
                raise _bad(what, f"{f.name} must have one entry per level ({levels})")
            for v in value:
                _check_value(f.name, v, like[0], what)
        else:
            _check_value(f.name, value, like, what)


def _levels(cfg: Any) -> int:
    channels = getattr(cfg, "block_channels", None)
    return len(channels) if isinstance(channels, (tuple, list)) else 0


def implied_blocks(cfg: Any) -> int:
    """How many blocks (ResBlocks, transformer blocks, layers) a network config asks for; each one
    holds at least two tensors, so a file with fewer tensors cannot fill it."""
    layers = getattr(cfg, "layers_per_block", None)
    if isinstance(layers, (tuple, list)):  # U-Net: down L, up L + 1 per level, each with depth transformers
        blocks = sum((2 * n + 1) * (1 + int(a) * d)
                     for n, a, d in zip(layers, cfg.attention, cfg.transformer_depth, strict=True))
        return blocks + 2 + cfg.transformer_depth[-1]
    if isinstance(layers, int):  # autoencoder: encoder L, decoder L + 1 per level, mid blocks
        return _levels(cfg) * (2 * layers + 1) + 4
    return int(getattr(cfg, "layers", 1))


def check_config(cfg: Any, what: str, n_tensors: int | None = None) -> None:
    """Refuse (CheckpointError naming the field) a network config dataclass with a size out of
    bounds, per-level tuples of another length than its levels, widths its GroupNorm or heads do not
    divide, or (given the file's tensor count) more blocks than the file could hold."""
    levels = _levels(cfg)
    if hasattr(cfg, "block_channels") and not 1 <= levels <= MAX_LEVELS:
        raise _bad(what, f"{levels} levels (block_channels) is outside the supported range 1..{MAX_LEVELS}")
    _check_fields(cfg, what, levels if hasattr(cfg, "block_channels") else None)
    channels = getattr(cfg, "block_channels", ())
    groups = getattr(cfg, "norm_groups", None)
    if groups is not None and any(c % groups for c in channels):
        raise _bad(what, f"norm_groups={groups} does not divide the widths {tuple(channels)}")
    heads = getattr(cfg, "num_heads", None)
    if heads is not None and any(c % h for c, h in zip(channels, heads, strict=True)):
        raise _bad(what, f"num_heads={tuple(heads)} do not divide the widths {tuple(channels)}")
    if hasattr(cfg, "heads") and hasattr(cfg, "width") and cfg.width % cfg.heads:
        raise _bad(what, f"heads={cfg.heads} does not divide width={cfg.width}")
    if n_tensors is not None and 2 * implied_blocks(cfg) > n_tensors:
        raise _bad(what, f"the config asks for {implied_blocks(cfg)} blocks but the weights hold only "
                         f"{n_tensors} tensors")


def check_schedule(cfg: Any, what: str) -> None:
    """Refuse a noise schedule (ScheduleConfig) with non-finite values (a NaN beta samples an
    all-black image), betas outside [0, 1), or more training timesteps than any schedule needs
    (the tables are allocated per timestep)."""
    betas = cfg.trained_betas
    if betas is not None:
        limit = BOUNDS["num_train_timesteps"][1]
        if not (isinstance(betas, (list, tuple)) and len(betas) <= limit
                and all(_real(v) and 0.0 <= v < 1.0 for v in betas)):
            raise _bad(what, f"trained_betas must be a list of at most {limit} numbers in [0, 1)")
    clipped = cfg.lambda_min_clipped
    if isinstance(clipped, float) and clipped == -math.inf:  # diffusers' "no clipping"
        cfg = dataclasses.replace(cfg, lambda_min_clipped=None)
    _check_fields(dataclasses.replace(cfg, trained_betas=None), what)
    for name in ("beta_start", "beta_end"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise _bad(what, f"{name}={getattr(cfg, name)!r} is outside [0, 1)")


def check_shapes(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """The module's parameter and buffer names and shapes must be exactly those of `tensors`
    (real, or meta tensors from `header_tensors`). Runs on a module built on the meta device."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise _bad(what, f"weights do not fit the config: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    wrong = [(k, tuple(tensors[k].shape), s) for k, s in expected.items() if tuple(tensors[k].shape) != s]
    if wrong:
        k, got, want = wrong[0]
        raise _bad(what, f"{len(wrong)} tensors have other shapes than the config gives, e.g. {k!r}: "
                         f"{list(got)} in the file, {list(want)} in the config")


M = TypeVar("M", bound=nn.Module)


def build_checked(build: Callable[[], M], configs: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  what: str) -> M:
    """Check each config (name -> dataclass, e.g. {"unet": cfg.unet}) against the bounds and the
    tensor count, build the module on the meta device and check it against `tensors`. The returned
    module holds no memory: fill it with `module.load_state_dict(state, assign=True)`."""
    for name, cfg in configs.items():
        check_config(cfg, f"{what} ({name})", len(tensors))
    with on_meta_device():
        module = build()
    check_shapes(module, tensors, what)
    return module


def fill(module: M, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> M:
    """Assign the weights (cast to dtype; None keeps theirs) to a module that `build_checked` built and
    checked against them: the tensors become the parameters (no copy when the dtype is kept).
    Frozen, eval mode."""
    module.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, strict=True,
                           assign=True)
    return module.eval().requires_grad_(False)


def load_system_file(path: str | Path, system: str, what: str, from_dict: Callable[[dict[str, Any]], Any],
                     build: Callable[[Any], M], parts: Callable[[Any], Mapping[str, Any]],
                     check: Callable[[Any], None] | None = None) -> M:
    """A model written with `io.save_with_config` for `system`: its config parsed (`from_dict`; a
    malformed one is a CheckpointError naming `what`) and checked (`check`, then each of
    `parts(cfg)` against the bounds), the module (`build(cfg)`) built on the meta device and checked
    against the file's tensors, then filled in float32: a crafted config is refused before anything
    is allocated. Frozen, eval mode."""
    raw = read_config(path, what, system)
    try:
        cfg = from_dict(raw)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed config of {what} ({type(e).__name__}: {e})") from None
    if check is not None:
        check(cfg)
    tensors = header_tensors(check_safetensors_header(path))
    module = build_checked(lambda: build(cfg), parts(cfg), tensors, str(path))
    return fill(module, load_state_dict(path), torch.float32)


def load_checked_file(path: str | Path, system: str, what: str, config_cls: Callable[..., Any],
                      module_cls: Callable[[Any], M]) -> M:
    """A module written by `io.save_module` for `system`: its config (`config_cls(**saved)`) checked
    against the bounds, the module built on the meta device and checked against the file's tensors,
    then filled in float32 (a 16-bit file is storage; the CPU computes in float32): a crafted config is
    refused before anything is allocated. Frozen, eval mode."""
    try:
        cfg = config_cls(**read_config(path, what, system))
    except TypeError as e:
        raise CheckpointError(f"{path}: malformed config of {what} ({e})") from None
    tensors = header_tensors(check_safetensors_header(path))
    module = build_checked(lambda: module_cls(cfg), {system: cfg}, tensors, str(path))
    return fill(module, load_state_dict(path), torch.float32)
