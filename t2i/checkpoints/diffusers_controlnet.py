"""diffusers' `ControlNetModel` folders (config.json + diffusion_pytorch_model.safetensors) -> ControlNet.

The config is a U-Net config without the up path plus the conditioning embedding's fields; our
ControlNet carries diffusers' parameter names, so the weights load as they are, checked against the
config on the meta device first (`limits`), as every diffusers component is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from t2i.checkpoints.diffusers_folder import build_and_load, read_config_file
from t2i.checkpoints.diffusers_nets import check_unsupported, unet_config_from_diffusers
from t2i.checkpoints.io import CheckpointError
from t2i.checkpoints.limits import MAX_LEVELS, WIDE
from t2i.nets.controlnet import ControlNet, ControlNetConfig

_CONTROLNET_UNSUPPORTED: dict[str, Any] = {"addition_embed_type_num_heads": 64}


def controlnet_config_from_diffusers(cfg: dict[str, Any]) -> ControlNetConfig:
    """ControlNetConfig from the dict of a diffusers ControlNetModel `config.json`; ValueError naming
    any option we do not implement."""
    what = "ControlNetModel config"
    if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{what}: _class_name is {cfg.get('_class_name')!r}, not 'ControlNetModel'")
    check_unsupported(cfg, _CONTROLNET_UNSUPPORTED, what)
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise ValueError(f"{what}: unsupported option controlnet_conditioning_channel_order={order!r}")
    # The encoder is a U-Net's down half: describe the mirror up path the U-Net reader expects.
    down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    mirror = [t.replace("Down", "Up") for t in reversed(down)] if isinstance(down, list) else down
    unet = unet_config_from_diffusers({**cfg, "up_block_types": mirror, "time_cond_proj_dim": None})
    widths = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    if (not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_LEVELS
            or not all(isinstance(w, int) and 1 <= w <= WIDE for w in widths)):
        raise ValueError(f"{what}: conditioning_embedding_out_channels={widths!r} is not 1 to {MAX_LEVELS} "
                         f"widths of 1..{WIDE}")
    channels = cfg.get("conditioning_channels", 3)
    if not isinstance(channels, int) or not 1 <= channels <= 64:
        raise ValueError(f"{what}: conditioning_channels={channels!r} is not 1..64")
    return ControlNetConfig(unet, channels, tuple(widths), order == "bgr",
                            bool(cfg.get("global_pool_conditions", False)))


def is_controlnet_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_controlnet(folder: str | Path, dtype: torch.dtype | None = torch.float32,
                    variant: str | None = None) -> ControlNet:
    """A diffusers ControlNetModel folder -> ControlNet (frozen, eval mode), in dtype (None: as stored)."""
    folder = Path(folder)
    if not is_controlnet_folder(folder):
        raise FileNotFoundError(f"ControlNet folder not found (a folder with config.json and "
                                f"diffusion_pytorch_model.safetensors): {folder}")
    cfg = read_config_file(controlnet_config_from_diffusers, folder / "config.json")
    try:
        net = build_and_load(lambda: ControlNet(cfg), cfg.unet, folder, dtype, variant)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    net.name = folder.resolve().name  # what the PNG parameters record, as A1111 records the model
    return net
