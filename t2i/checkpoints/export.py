"""Writing SD parts out: as one file in the original SD key layout, or as a diffusers folder.
Both keep the weights' values and dtype exactly; nothing is cast.

`parts` is a LatentDiffusionParts, or anything with its attributes (unet, vae, text_encoder,
schedule, layout, scheduler_class, zero_empty_negative, defaults as a dict).

The single file carries its resolved configs in the safetensors metadata (`t2i_sd_config`),
so t2i reads it back without guessing; other tools (diffusers' `from_single_file`,
AUTOMATIC1111, ComfyUI) read the keys. The folder is what `save_pretrained` writes:
model_index.json, unet/ vae/ text_encoder(_2)/ tokenizer(_2)/ scheduler/.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from t2i.checkpoints.diffusers_nets import unet_config_to_diffusers, vae_config_to_diffusers
from t2i.checkpoints.diffusers_scheduler import write_scheduler_config
from t2i.checkpoints.io import save_state_dict
from t2i.checkpoints.openclip import identity_openclip_layer
from t2i.checkpoints.parts import LatentDiffusionParts, text_towers
from t2i.checkpoints.sd_keys import (
    TEXT_SLOTS,
    UNET_PREFIX,
    VAE_PREFIX,
    text_from_ours,
    unet_to_original,
    vae_to_original,
)
from t2i.checkpoints.single_file_config import METADATA_KEY, SingleFileConfig
from t2i.checkpoints.transformers_text import clip_config_to_transformers, clip_state_dict_to_transformers

DEFAULT_SCHEDULER = "EulerDiscreteScheduler"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def single_file_config(parts: LatentDiffusionParts) -> SingleFileConfig:
    towers = text_towers(parts.text_encoder)
    return SingleFileConfig(parts.layout, parts.unet.cfg, parts.vae.cfg, [t.model.cfg for t in towers],
                            [t.tokenizer.pad_token for t in towers], parts.schedule, dict(parts.defaults),
                            parts.zero_empty_negative, parts.scheduler_class)


def to_original_state_dict(parts: LatentDiffusionParts) -> dict[str, torch.Tensor]:
    """The weights under the original single-file keys (see sd_keys.py)."""
    state = {UNET_PREFIX + k: v for k, v in unet_to_original(_state(parts.unet), parts.unet.cfg).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_original(_state(parts.vae), parts.vae.cfg).items()})
    for slot, enc in zip(TEXT_SLOTS[parts.layout], text_towers(parts.text_encoder), strict=True):
        text = text_from_ours(_state(enc.model), slot.layout)
        if slot.cut_last:  # SD2: append the identity block that "penultimate" readers skip
            text.update(identity_openclip_layer(enc.model.cfg.layers, text))
        state.update({slot.prefix + k: v for k, v in text.items()})
    return state


def save_single_file(parts: LatentDiffusionParts, path: str | Path) -> Path:
    """Write `parts` as one `.safetensors` in the original SD layout, configs in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors only")
    save_state_dict(to_original_state_dict(parts), path,
                    metadata={METADATA_KEY: single_file_config(parts).to_json(), "format": "pt"})
    return path


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_diffusers_folder(parts: LatentDiffusionParts, folder: str | Path,
                          save: Callable[[dict[str, torch.Tensor], Path, dict[str, str]], None] = save_state_dict
                          ) -> Path:
    """Write `parts` as a diffusers folder that `DiffusionPipeline.from_pretrained` and t2i read.

    The folder is built next to the target and renamed into place, so a failure leaves no
    half-written model; an existing target is refused. save(state, path, metadata) writes each
    weight file (benchmarks pass one that streams random values for networks on the meta device)."""
    folder = Path(folder)
    if folder.exists():  # ValueError: the CLI reports it as a one-line user error
        raise ValueError(f"{folder} exists; choose a new folder")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    family = parts.layout
    dtype = str(next(parts.unet.parameters()).dtype).removeprefix("torch.")

    _write_json(tmp / "unet" / "config.json", unet_config_to_diffusers(parts.unet.cfg))
    save(_state(parts.unet), tmp / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    _write_json(tmp / "vae" / "config.json", vae_config_to_diffusers(parts.vae.cfg))
    save(_state(parts.vae), tmp / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})

    suffixes = {"sd1": [""], "sd2": [""], "sdxl": ["", "_2"], "sdxl_refiner": ["_2"]}[family]
    components: dict[str, list] = {}
    for s, enc in zip(suffixes, text_towers(parts.text_encoder), strict=True):
        config = {**clip_config_to_transformers(enc.model.cfg), "dtype": dtype}
        _write_json(tmp / f"text_encoder{s}" / "config.json", config)
        weights = clip_state_dict_to_transformers(_state(enc.model), prefixed=True)
        save(weights, tmp / f"text_encoder{s}" / "model.safetensors", {"format": "pt"})
        enc.tokenizer.save(tmp / f"tokenizer{s}")
        components[f"text_encoder{s}"] = ["transformers", config["architectures"][0]]
        components[f"tokenizer{s}"] = ["transformers", "CLIPTokenizer"]

    scheduler = parts.scheduler_class or DEFAULT_SCHEDULER
    write_scheduler_config(parts.schedule, tmp / "scheduler", scheduler)
    index: dict = {"_class_name": {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                                   "sdxl": "StableDiffusionXLPipeline",
                                   "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}[family],
                   "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], **components}
    if family in ("sd1", "sd2"):
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=parts.zero_empty_negative)
        if family == "sdxl_refiner":
            index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    _write_json(tmp / "model_index.json", index)
    tmp.rename(folder)
    return folder
