"""Stable Diffusion 1.x / 2.x / XL (seed 002, seed 003): diffusers folders and single files.

The family's facts: which layouts it reads (a diffusers pipeline folder, an original-layout
single file), how it loads them, and a tiny random model for the tests every family gets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from t2i.systems.base import System


def detect(path: Path) -> bool:
    from t2i.checkpoints.diffusers_folder import is_diffusers_folder
    from t2i.checkpoints.single_file import is_single_file

    return is_diffusers_folder(path) or is_single_file(path)


def load(path: Path, dtype: torch.dtype = torch.float32):
    from t2i.checkpoints.diffusers_folder import is_diffusers_folder, load_diffusers_pipeline
    from t2i.checkpoints.single_file import load_single_file

    if is_diffusers_folder(path):
        return load_diffusers_pipeline(path, dtype=dtype)
    return load_single_file(path, dtype=dtype)


def write_tiny(folder: Path, seed: int = 0) -> Path:
    raise NotImplementedError("H5: a tiny random SD 1.x diffusers folder written with t2i's own exporter")


SYSTEM = System(
    name="stable_diffusion",
    description="Stable Diffusion 1.x/2.x/XL: a diffusers folder (model_index.json) or a single .safetensors/.ckpt",
    detect=detect, load=load, write_tiny=write_tiny)
