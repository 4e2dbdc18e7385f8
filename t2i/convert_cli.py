"""`t2i convert SRC DST`: a model in one layout of its family -> another layout.

SRC is any model the registry recognises (a path, or a shipped model's name); its family loads it
in the dtype its weights are stored in and writes DST with its `export`. A family that cannot
export is refused, naming it. For Stable Diffusion: a diffusers folder <-> one `.safetensors` in
the original SD layout, the direction following DST (a name ending in `.safetensors` gets a single
file, anything else a new diffusers folder); SRC may also be a `.ckpt`, read with
`torch.load(weights_only=True)`. Weights keep their dtype and values exactly.

`--fp16` instead keeps the layout and halves the bytes: a t2i single-file model (`.safetensors` with a
`t2i_system`) rewritten with every floating tensor in float16 (bf16 for one past float16's range) and
its metadata as it was; how the shipped family models are made from their runs' float32 files. The
loaders widen the weights again to the dtype asked for.

SRC may also be a sharded training checkpoint (`RUN/checkpoints/step_N.dcp`, written by
`t2i train ... --parallel fsdp`): its shards are reassembled and its family exports what it ships
(for the LDM the EMA model, the `model.safetensors` that `t2i generate` loads).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from t2i.checkpoints.single_file_config import PREDICTIONS
from t2i.systems.base import System
from t2i.systems.registry import resolve


def exporter(system: System) -> Callable[..., Path]:
    """The family's `export(pipe, dst) -> Path`, or ValueError."""
    export = system.export
    if export is None:
        raise ValueError(f"the {system.name} family cannot export models (t2i convert works on families with "
                         "an export)")
    return export


def convert(src: str | Path, dst: str | Path, prediction: str | None = None, config: str | Path | None = None) -> Path:
    """Convert SRC to DST with SRC's family (for SD: `.safetensors` DST a single file, else a folder)."""
    dst = Path(dst)
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new name (convert never overwrites)")
    from t2i.train.checkpoint import SHARDED_META

    if (Path(src) / SHARDED_META).is_file():
        from t2i.train.sharded_export import export_sharded

        return export_sharded(src, dst)
    system, path = resolve(src)
    export = exporter(system)
    options: dict[str, Any] = {k: v for k, v in (("prediction", prediction), ("config", config)) if v is not None}
    pipe = system.load(path, None, **options)  # None: the dtype the weights are stored in
    return export(pipe, dst)


def halve(src: str | Path, dst: str | Path) -> Path:
    """SRC (a t2i single-file model) -> DST with its floating tensors in float16, metadata kept."""
    from safetensors import safe_open

    from t2i.checkpoints.io import load_state_dict, save_state_dict
    from t2i.compact import narrow

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new name (convert never overwrites)")
    if not src.is_file() or src.suffix != ".safetensors":
        raise ValueError(f"--fp16 takes one t2i .safetensors model file; {src} is not one")
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
    if "t2i_system" not in meta:
        raise ValueError(f"--fp16 takes a t2i model file; {src} has no 't2i_system' metadata")
    state = load_state_dict(src)
    save_state_dict({k: narrow(v, torch.float16) if v.is_floating_point() else v for k, v in state.items()}, dst,
                    metadata=meta)
    return dst


def _run(args: argparse.Namespace) -> int:
    if args.fp16:
        if args.prediction or args.config:
            raise ValueError("--fp16 keeps the layout; --prediction and --config do not apply")
        print(f"wrote {halve(args.src, args.dst)}")
        return 0
    out = convert(args.src, args.dst, args.prediction, args.config)
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="diffusers folder <-> single .safetensors (original SD layout); sharded training "
        "checkpoint -> model file",
        description="Convert a Stable Diffusion 1/2/XL checkpoint between a diffusers folder and one "
                    ".safetensors file in the original key layout (DST ending in .safetensors: a file; "
                    "otherwise a new folder). Weights are copied bit for bit. A sharded training checkpoint "
                    "(RUN/checkpoints/step_N.dcp of an FSDP run) becomes the model file its family ships.")
    p.add_argument("src", help="diffusers folder, or .safetensors / .ckpt single file (or a shipped model's name), "
                   "or a sharded training checkpoint directory")
    p.add_argument("dst", help="output .safetensors file, or a new folder")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="single-file source only: eps or v prediction (default: file metadata, a v_pred key, "
                        "a FILE.yaml with parameterization v, else v for SD 2.x and eps otherwise)")
    p.add_argument("--config", type=Path, default=None,
                   help="single-file source only: a diffusers folder whose configs describe the nets")
    p.add_argument("--fp16", action="store_true",
                   help="keep the layout of a t2i .safetensors model file and store its floating tensors in "
                        "float16 (half the bytes; how the shipped family models are made)")
    p.set_defaults(func=_run)
