"""`t2i convert SRC DST`: a model in one layout of its family -> another layout.

SRC is any model the registry recognises (a path, or a shipped model's name); its family loads it
in the dtype its weights are stored in and writes DST with its `export`. A family that cannot
export is refused, naming it. For Stable Diffusion: a diffusers folder <-> one `.safetensors` in
the original SD layout, the direction following DST (a name ending in `.safetensors` gets a single
file, anything else a new diffusers folder); SRC may also be a `.ckpt`, read with
`torch.load(weights_only=True)`. Weights keep their dtype and values exactly.

SRC may also be a sharded training checkpoint (`RUN/checkpoints/step_N.dcp`, written by
`t2i train ... --parallel fsdp`): its shards are reassembled and its family exports what it ships
(for the LDM the EMA model, the `model.safetensors` that `t2i generate` loads).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _run(args: argparse.Namespace) -> int:
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
    p.set_defaults(func=_run)
