"""The diffusers folder layout of a Stable Diffusion pipeline, read into our modules.

    model_index.json          which pipeline class and components
    unet/       config.json + diffusion_pytorch_model.safetensors
    vae/        config.json + diffusion_pytorch_model.safetensors
    text_encoder(_2)/  config.json + model.safetensors (transformers layout)
    tokenizer(_2)/     vocab.json + merges.txt (+ special_tokens_map.json)
    scheduler/  scheduler_config.json

Our U-Net and autoencoder use the diffusers parameter names, so their weights load as they
are; the text encoders are mapped in `transformers_text`. Everything is offline. The result is
`LatentDiffusionParts` (the SD family builds the pipeline). Every config is checked against bounds
and against the weight files' headers on the meta device before anything is allocated (`limits`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
from t2i.checkpoints.diffusers_scheduler import scheduler_config_from_dict
from t2i.checkpoints.io import (
    CheckpointError,
    check_safetensors_header,
    find_weights,
    header_tensors,
    load_state_dict,
    read_json_object,
)
from t2i.checkpoints.limits import build_checked, check_schedule, fill
from t2i.checkpoints.parts import LatentDiffusionParts, text_layout, text_towers
from t2i.checkpoints.transformers_text import clip_config_from_transformers, clip_state_dict_from_transformers
from t2i.compact import compact_, loading_cast
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.unet import UNet
from t2i.text.clip import CLIPTextModel
from t2i.text.encoders import TextEncoder, load_diffusers_text_encoder

SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "LatentConsistencyModelPipeline",  # an SD U-Net with a guidance-embedding input, sampled by `lcm`
)


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def read_config_file(read: Callable[..., Any], file: Path, **options: Any) -> Any:
    """`read(the JSON object in file, **options)`: a config from a config.json, any failure (missing
    file aside) one CheckpointError naming the file."""
    try:
        return read(read_json_object(file), **options)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: {e}") from None


def file_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """What the weight files hold: meta tensors from safetensors headers (nothing read yet), or the
    tensors of pickles (which have no header to read first)."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(header_tensors(check_safetensors_header(file)) if file.suffix == ".safetensors"
                     else load_state_dict(file))
    return state


M = TypeVar("M", bound=torch.nn.Module)


def build_and_load(build: Callable[[], M], cfg: Any, folder: Path, dtype: torch.dtype | None, variant: str | None,
                    stem: str = "diffusion_pytorch_model", compact: torch.dtype | None = None) -> M:
    """Check the config against bounds and the files' tensors (names and shapes, from the headers),
    build the module on the meta device (no random init: for the SD U-Net that alone took most of
    the load time), then read the weights and assign them, cast to dtype (None: as stored).
    compact (a 16-bit dtype): read tensor by tensor straight into compact storage, float32 compute
    (`t2i.compact`; dtype must then be float32)."""
    cast = loading_cast(compact, dtype)
    files = find_weights(folder, stem, variant)
    tensors = file_tensors(files)
    module = build_checked(build, {"config": cfg}, tensors, str(folder))
    if any(t.is_meta for t in tensors.values()):
        tensors = {}
        for file in files:
            tensors.update(load_state_dict(file, cast=cast))  # safetensors: memory-mapped unless cast; NaN/Inf refused
    elif cast is not None:
        tensors = {k: cast(v) for k, v in tensors.items()}
    if compact is None:
        return fill(module, tensors, dtype)
    return compact_(fill(module, tensors, None), compact)


def load_unet(folder: Path, dtype: torch.dtype | None = torch.float32, variant: str | None = None,
              compact: torch.dtype | None = None) -> UNet:
    cfg = read_config_file(unet_config_from_diffusers, folder / "config.json")
    return build_and_load(lambda: UNet(cfg), cfg, folder, dtype, variant, compact=compact)


def load_vae(folder: Path, dtype: torch.dtype = torch.float32, variant: str | None = None,
             compact: torch.dtype | None = None) -> AutoencoderKL:
    cfg = read_config_file(vae_config_from_diffusers, folder / "config.json")
    return build_and_load(lambda: AutoencoderKL(cfg), cfg, folder, dtype, variant, compact=compact)


def check_text_encoder(folder: Path) -> None:
    """Check a `text_encoder(_2)/` folder's config against bounds and its weights' names and shapes
    (headers only, on the meta device) before the text encoder loader allocates anything."""
    tensors = clip_state_dict_from_transformers(file_tensors(find_weights(folder, "model")))
    projection = "text_projection.weight" in tensors
    cfg = read_config_file(clip_config_from_transformers, folder / "config.json", with_projection=projection)
    build_checked(lambda: CLIPTextModel(cfg), {"config": cfg}, tensors, str(folder))


def _load_text_encoder(root: Path, dtype: torch.dtype | None, compact: torch.dtype | None) -> TextEncoder:
    """The folder's text encoder(s), checked first; compact: each tower's model compacted."""
    for sub in ("text_encoder", "text_encoder_2"):
        if (root / sub).is_dir():
            check_text_encoder(root / sub)
    if compact is None:
        return load_diffusers_text_encoder(root, dtype)
    # as stored (memory-mapped), then compacted: a 16-bit file's weights stay as they are, as in
    # `t2i.compact.compact_dtype`, and the float32 of a float32 file is resident only until then
    text_encoder = load_diffusers_text_encoder(root, None)
    for tower in text_towers(text_encoder):
        compact_(tower.model, compact, keep_first=False)  # nothing reads a text model's dtype
    return text_encoder


def read_schedule(folder: Path) -> tuple[ScheduleConfig, str | None]:
    """(the schedule, the scheduler class name) of `scheduler/scheduler_config.json`; non-finite or
    out-of-range values refused."""
    file = folder / "scheduler" / "scheduler_config.json"
    raw = read_json_object(file, "a scheduler config")
    schedule = read_config_file(scheduler_config_from_dict, file, source=str(file))
    check_schedule(schedule, str(file))
    name = raw.get("_class_name")
    return schedule, name if isinstance(name, str) else None


def load_diffusers_parts(path: str | Path, dtype: torch.dtype | None = torch.float32,
                         variant: str | None = None, compact: torch.dtype | None = None) -> LatentDiffusionParts:
    """A diffusers Stable Diffusion (1.x, 2.x, XL) folder -> its parts, in `dtype` (None: the dtype the
    U-Net's weights are stored in, for every part). compact (a 16-bit dtype, with dtype float32):
    every part with compact weights (`t2i.compact`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    index = read_json_object(root / "model_index.json", "a diffusers model index")
    cls = index.get("_class_name", "")
    if cls not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{root}: unsupported pipeline class {cls!r} "
                              f"(supported: {', '.join(sorted(SUPPORTED_PIPELINES))})")
    for part in ("unet", "vae", "scheduler"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root / part} is missing: not a complete diffusers folder")
    loading_cast(compact, dtype)  # a compact load that does not compute in float32 is refused here
    schedule, scheduler_class = read_schedule(root)
    if compact is not None:
        # First, so that the text encoders' transient file pages (3.3 GB for SDXL's two towers in
        # float32) meet no other part.
        text_encoder = _load_text_encoder(root, dtype, compact)
    unet = load_unet(root / "unet", dtype, variant, compact)
    dtype = dtype or next(unet.parameters()).dtype
    vae = load_vae(root / "vae", dtype, variant, compact)
    if compact is None:
        text_encoder = _load_text_encoder(root, dtype, None)
    return LatentDiffusionParts(unet, vae, text_encoder, schedule, root.name, text_layout(text_encoder),
                                scheduler_class, bool(index.get("force_zeros_for_empty_prompt", False)))
