"""TAESD weight files: diffusers' `AutoencoderTiny` folders and single files, madebyollin's
`taesd_decoder` / `taesd_encoder` files, and t2i's own (diffusers' names + our config in the metadata).

Every layout is read into diffusers' parameter names, which are t2i's (`t2i.autoencoders.preview`):
`decoder.layers.N.conv.{0,2,4}.{weight,bias}` for a residual block, `decoder.layers.N.weight` for a
plain conv. madebyollin's files (github.com/madebyollin/taesd, `taesd.py`) hold one
`nn.Sequential` each without the prefix; their decoder starts with a weightless `Clamp()` module
that diffusers applies in `forward` instead, so decoder index N there is diffusers' N - 1 (the
encoder's indices agree). Nothing here builds a model: readers return (config, state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2i.checkpoints.io import (
    CheckpointError,
    load_component_weights,
    load_state_dict,
    read_json_object,
    save_state_dict,
)

WEIGHTS_STEM = "diffusion_pytorch_model"
# the index shift of each part from madebyollin's layout to diffusers' (the decoder's leading Clamp)
ORIGINAL_INDEX_SHIFT = {"encoder": 0, "decoder": -1}
# diffusers' byte quantisation of TAESD latents for storage (`AutoencoderTiny.scale_latents`); it
# never enters `decode`, but a folder carries it.
LATENT_MAGNITUDE, LATENT_BYTE_SHIFT = 3, 0.5


@dataclass
class TAESDFile:
    """What a TAESD file says.

    Attributes:
        state: weights under diffusers' names.
        config: `PreviewDecoderConfig` fields; latent_scale is None where the file does not say
            which VAE it belongs to (every file made elsewhere).
        taesd_scaling, taesd_shift: diffusers' `scaling_factor`/`shift_factor` of the TAESD itself: its
            networks read u = x / taesd_scaling + taesd_shift of the diffusion latents x (1 and 0 for
            TAESD and TAESDXL, which read the diffusion latents; madebyollin's files are taken so).
    """

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    taesd_scaling: float = 1.0
    taesd_shift: float = 0.0

    @property
    def latent_scale(self) -> float | None:
        return self.config.get("latent_scale")


def from_original(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """madebyollin's `taesd_{part}` keys ("1.weight", "3.conv.0.bias") -> diffusers' ("decoder.layers.0.weight")."""
    shift = ORIGINAL_INDEX_SHIFT[part]
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or not rest:
            raise CheckpointError(f"not a TAESD {part} key in madebyollin's layout: {key!r}")
        out[f"{part}.layers.{int(index) + shift}.{rest}"] = value
    return out


def shape_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`PreviewDecoderConfig` fields (all but the latent scaling) read off diffusers-named weights."""
    if "decoder.layers.0.weight" not in state:
        raise CheckpointError("not a TAESD: no 'decoder.layers.0.weight' (the decoder's input conv)")
    width, latent_channels = state["decoder.layers.0.weight"].shape[:2]
    indices = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")})
    stages, out_channels = [0], None
    for i in indices[1:]:
        if f"decoder.layers.{i}.conv.0.weight" in state:
            stages[-1] += 1  # a residual block
        elif f"decoder.layers.{i}.bias" not in state:
            stages.append(0)  # the bias-free conv after an upsampling
        else:
            out_channels = state[f"decoder.layers.{i}.weight"].shape[0]  # the output conv
    if out_channels is None or len(set(stages[:-1])) > 1:
        raise CheckpointError(f"unsupported TAESD decoder: residual blocks per stage {stages}")
    return dict(latent_channels=int(latent_channels), out_channels=int(out_channels), upsamples=len(stages) - 1,
                width=int(width), blocks=stages[0] if len(stages) > 1 else 0, final_blocks=stages[-1],
                encoder=any(k.startswith("encoder.") for k in state))


def diffusers_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """`PreviewDecoderConfig` fields -> diffusers' `AutoencoderTiny` config.json. The folder's
    scaling_factor is 1: the networks read the diffusion latents, as in TAESD's own folder."""
    decoder_blocks = [cfg["blocks"]] * cfg["upsamples"] + [cfg["final_blocks"]]
    widths = [cfg["width"]] * len(decoder_blocks)
    return {"_class_name": "AutoencoderTiny", "in_channels": cfg["out_channels"], "out_channels": cfg["out_channels"],
            "encoder_block_out_channels": widths, "decoder_block_out_channels": widths, "act_fn": "relu",
            "upsample_fn": "nearest", "latent_channels": cfg["latent_channels"], "upsampling_scaling_factor": 2,
            "num_encoder_blocks": decoder_blocks[::-1], "num_decoder_blocks": decoder_blocks,
            "latent_magnitude": LATENT_MAGNITUDE, "latent_shift": LATENT_BYTE_SHIFT, "force_upcast": False,
            "scaling_factor": 1.0, "shift_factor": 0.0}


def shape_from_diffusers(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """diffusers' `AutoencoderTiny` config -> `PreviewDecoderConfig` fields (all but the latent scaling);
    refuses what t2i's TAESD does not build."""
    decoder_blocks = list(config.get("num_decoder_blocks", (3, 3, 3, 1)))
    widths = set(config.get("decoder_block_out_channels", (64,))) | set(config.get("encoder_block_out_channels", (64,)))
    encoder_blocks = list(config.get("num_encoder_blocks", (1, 3, 3, 3)))
    unsupported = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
    for key, value in unsupported.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{where}: TAESD with {key}={config[key]!r} is not supported (only {value!r})")
    if len(widths) != 1 or len(set(decoder_blocks[:-1])) > 1 or encoder_blocks != decoder_blocks[::-1]:
        raise CheckpointError(f"{where}: unsupported TAESD shape: widths {sorted(widths)}, decoder blocks "
                              f"{decoder_blocks}, encoder blocks {encoder_blocks}")
    return dict(latent_channels=config.get("latent_channels", 4), out_channels=config.get("out_channels", 3),
                upsamples=len(decoder_blocks) - 1, width=widths.pop(), blocks=decoder_blocks[0],
                final_blocks=decoder_blocks[-1])


def _t2i_config(path: Path, system: str) -> dict[str, Any] | None:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "t2i_config" not in meta:
        return None
    if meta.get("t2i_system") != system:
        raise ValueError(f"{path}: not a preview decoder file (its t2i_system is {meta.get('t2i_system')!r})")
    return json.loads(meta["t2i_config"])


def _read_folder(folder: Path, system: str) -> TAESDFile:
    config = read_json_object(folder / "config.json", "a diffusers AutoencoderTiny config")
    if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise CheckpointError(f"{folder}: not an AutoencoderTiny folder (_class_name {config['_class_name']!r})")
    state = load_component_weights(folder, WEIGHTS_STEM)
    ours = next((c for f in sorted(folder.glob(f"{WEIGHTS_STEM}*.safetensors")) if (c := _t2i_config(f, system))),
                None)
    shape = shape_from_diffusers(config, folder)
    shape["encoder"] = any(k.startswith("encoder.") for k in state)
    return TAESDFile(state, ours or {**shape, "latent_scale": None, "latent_shift": 0.0},
                     float(config.get("scaling_factor", 1.0)), float(config.get("shift_factor") or 0.0))


def _read_original(path: Path) -> dict[str, torch.Tensor]:
    """madebyollin's decoder file, and its encoder file beside it when there is one (taesd_encoder.*)."""
    state = from_original(load_state_dict(path), "decoder")
    encoder = path.with_name(path.name.replace("decoder", "encoder"))
    if "decoder" in path.name and encoder.is_file():
        state.update(from_original(load_state_dict(encoder), "encoder"))
    return state


def read_taesd(path: str | Path, system: str) -> TAESDFile:
    """Any TAESD layout -> TAESDFile: a diffusers folder (config.json + diffusion_pytorch_model.*), a
    single file in diffusers' names (ours carry our config under "t2i_config", `system` its t2i_system),
    or madebyollin's decoder file (+ its encoder file beside it), or a folder holding those two."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        # madebyollin's repository layout: taesd_decoder.safetensors (or .pth) beside taesd_encoder.*
        found = sorted(path.glob("*_decoder.safetensors")) or sorted(path.glob("*_decoder.pth"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: neither a diffusers AutoencoderTiny folder (config.json) nor "
                                    f"one *_decoder.safetensors/.pth file of madebyollin's (found {len(found)})")
        path = found[0]
    if path.is_dir():
        return _read_folder(path, system)
    if not path.is_file():
        raise FileNotFoundError(f"preview decoder file not found: {path}")
    ours = _t2i_config(path, system)
    state = load_state_dict(path)
    if any(k.startswith("decoder.layers.") for k in state):
        return TAESDFile(state, ours or {**shape_from_state(state), "latent_scale": None, "latent_shift": 0.0})
    if any(k.startswith(("decoder.", "encoder.", "conv_in.", "stages.")) for k in state):
        raise CheckpointError(f"{path}: not a TAESD in diffusers' or madebyollin's layout (an earlier t2i preview "
                              "decoder or a full VAE?)")
    state = _read_original(path)
    return TAESDFile(state, {**shape_from_state(state), "latent_scale": None, "latent_shift": 0.0})


def _float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in state.items()}


def write_t2i_file(state: dict[str, torch.Tensor], cfg: dict[str, Any], path: str | Path, system: str) -> None:
    """Our single file: float32 weights under diffusers' names, `cfg` under "t2i_config"."""
    save_state_dict(_float_state(state), path, {"t2i_config": json.dumps(cfg), "t2i_system": system, "format": "pt"})


def write_diffusers_folder(state: dict[str, torch.Tensor], cfg: dict[str, Any], folder: str | Path,
                           system: str) -> None:
    """A diffusers `AutoencoderTiny` folder; the weights carry `cfg` as well, so t2i reads back the latent
    scaling that config.json cannot hold."""
    if not cfg["encoder"]:
        raise ValueError("a diffusers AutoencoderTiny folder needs the encoder too; this TAESD is decoder-only")
    folder = Path(folder)
    write_t2i_file(state, cfg, folder / f"{WEIGHTS_STEM}.safetensors", system)
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2) + "\n")
