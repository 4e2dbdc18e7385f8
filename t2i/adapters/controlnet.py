"""ControlNets as files and the shapes world's conditioning image.

t2i writes the ControlNets it trains (`t2i train controlnet`) as one self-describing safetensors each:
the weights under their network's own names and the resolved config in the metadata, `t2i_system`
"controlnet" for a U-Net ControlNet (`t2i.nets.controlnet`, diffusers' parameter names) and
"pixart_controlnet" for PixArt-delta's (`t2i.nets.pixart_controlnet`); the config also records the base
model the run trained on, for the user (the fit itself is checked against the model at generation).
`load_controlnet` reads those and diffusers' ControlNetModel folders alike.

The conditioning image of the shapes world is a box map (`box_map`): each object's bounding box filled
white on black, at the image size. Why boxes rather than an edge map: a box says where an object is and
how big, which is what the layout renderer's `--layouts truth` gets too, so the two are judged on the same
truth; the shape and the colour must still come from the prompt (an edge map would draw the shape's
outline for the model, and the judge's shape check would then test tracing, not the prompt). Boxes are also
what a user sketches by hand.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from t2i.checkpoints.io import save_with_config
from t2i.checkpoints.limits import load_system_file
from t2i.layout.spec import Layout
from t2i.nets.controlnet import ControlNet, ControlNetConfig
from t2i.nets.pixart_controlnet import PixArtControlNet, PixArtControlNetConfig

# t2i_system of each kind -> (config class, network class)
KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "controlnet": (ControlNetConfig, ControlNet),
    "pixart_controlnet": (PixArtControlNetConfig, PixArtControlNet),
}


def box_map(layout: Layout, width: int, height: int) -> np.ndarray:
    """The layout's boxes filled white (255) on black, (height, width, 3) uint8. A pixel is inside a box
    when its centre is: x0 <= (col + 0.5) / width < x1, likewise rows; on the 64x64 world's integer boxes
    exactly the box's pixels."""
    out = np.zeros((height, width, 3), np.uint8)
    cols, rows = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    for obj in layout.objects:
        x0, y0, x1, y1 = obj.box
        inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]  # (H, W)
        out[inside] = 255
    return out


def box_map_image(layout: Layout, width: int, height: int) -> Image.Image:
    """`box_map` as an RGB image, the `control_image` of a request."""
    return Image.fromarray(box_map(layout, width, height), "RGB")


def save_controlnet(net: ControlNet | PixArtControlNet, path: str | Path, base: str = "") -> None:
    """Write a ControlNet's weights (float32) and config, with `base` (the model it was trained on) noted."""
    system = "pixart_controlnet" if isinstance(net, PixArtControlNet) else "controlnet"
    cfg = net.cfg if isinstance(net, PixArtControlNet) else net.control_cfg
    state = {k: v.detach().float() for k, v in net.state_dict().items()}
    save_with_config(state, path, {**dataclasses.asdict(cfg), "base": base}, system)


def _config(cls: type, raw: dict[str, Any]) -> Any:
    return cls(**{k: v for k, v in raw.items() if k != "base"})


def load_controlnet(path: str | Path, dtype: torch.dtype = torch.float32) -> ControlNet | PixArtControlNet:
    """A ControlNet file written by `save_controlnet` (either kind) or a diffusers ControlNetModel folder ->
    the network, frozen, in `dtype`. Its `name` (the PNG parameters' ControlNet) is the file's stem, or for a
    run's `controlnet.safetensors` the run folder's name."""
    path = Path(path)
    if path.is_dir():
        from t2i.checkpoints.diffusers_controlnet import load_controlnet as load_diffusers

        return load_diffusers(path, dtype)
    system = _system_of(path)
    cfg_cls, net_cls = KINDS[system]
    parts = (lambda c: {"net": c.net}) if cfg_cls is PixArtControlNetConfig else (lambda c: {"unet": c.unet})
    net = load_system_file(path, system, f"a t2i {system.replace('_', ' ')} file",
                           lambda raw: _config(cfg_cls, raw), net_cls, parts)
    net.name = path.parent.name if path.stem == "controlnet" else path.stem  # a run's export: the run's name
    return net.to(dtype)


def _system_of(path: Path) -> str:
    """The file's t2i_system when it is one of KINDS; ValueError naming what it is otherwise."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"ControlNet not found: {path} (a t2i ControlNet .safetensors or a diffusers "
                                "ControlNetModel folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            system = (f.metadata() or {}).get("t2i_system")
    except Exception:  # safetensors' own error types: not a safetensors file
        raise ValueError(f"{path}: not a ControlNet (not a readable safetensors file)") from None
    if system not in KINDS:
        raise ValueError(f"{path}: not a ControlNet (its t2i_system is {system!r}; expected one of "
                         f"{', '.join(KINDS)})")
    return system
