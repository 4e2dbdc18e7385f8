"""`t2i convert SRC DST`: a diffusers folder <-> one `.safetensors` in the original SD layout.

The direction follows DST: a name ending in `.safetensors` gets a single file, anything else a
diffusers folder. SRC may be either (or a `.ckpt`, read with `torch.load(weights_only=True)`).
Weights keep their dtype and values exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from t2i.checkpoints.diffusers_folder import is_diffusers_folder, load_diffusers_pipeline
from t2i.checkpoints.export import save_diffusers_folder, save_single_file
from t2i.checkpoints.io import check_safetensors_header, find_weights
from t2i.checkpoints.single_file import PREDICTIONS, is_single_file, load_single_file
from t2i.systems.latent_diffusion import LatentDiffusionPipeline

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _stored_dtype(file: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in a safetensors file (None for pickles)."""
    if file.suffix != ".safetensors":
        return None
    header = check_safetensors_header(file)
    return next((_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__" and v["dtype"] in _DTYPES),
                None)


def load_any(src: Path, prediction: str | None = None, config: Path | None = None) -> LatentDiffusionPipeline:
    """A diffusers folder or a single file, in the dtype its U-Net is stored in."""
    if is_diffusers_folder(src):
        if prediction or config:
            raise ValueError("--prediction and --config apply to single-file sources only")
        dtype = _stored_dtype(find_weights(src / "unet", "diffusion_pytorch_model")[0]) or torch.float32
        return load_diffusers_pipeline(src, dtype=dtype)
    if is_single_file(src):
        return load_single_file(src, prediction=prediction, config=config, dtype=None)
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    raise ValueError(f"{src}: neither a diffusers folder (model_index.json) nor a .safetensors/.ckpt file")


def convert(src: str | Path, dst: str | Path, prediction: str | None = None, config: str | Path | None = None) -> Path:
    """Convert SRC (folder or single file) to DST (`.safetensors` file, else a new folder)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new name (convert never overwrites)")
    pipe = load_any(src, prediction, None if config is None else Path(config))
    if dst.suffix == ".safetensors":
        return save_single_file(pipe, dst)
    return save_diffusers_folder(pipe, dst)


def _run(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, args.prediction, args.config)
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="diffusers folder <-> single .safetensors (original SD layout)",
        description="Convert a Stable Diffusion 1/2/XL checkpoint between a diffusers folder and one "
                    ".safetensors file in the original key layout (DST ending in .safetensors: a file; "
                    "otherwise a new folder). Weights are copied bit for bit.")
    p.add_argument("src", help="diffusers folder, or .safetensors / .ckpt single file")
    p.add_argument("dst", help="output .safetensors file, or a new folder")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="single-file source only: eps or v prediction (default: file metadata, a v_pred key, "
                        "a FILE.yaml with parameterization v, else v for SD 2.x and eps otherwise)")
    p.add_argument("--config", type=Path, default=None,
                   help="single-file source only: a diffusers folder whose configs describe the nets")
    p.set_defaults(func=_run)
