"""What a Stable Diffusion checkpoint holds, once read: the networks and the facts stored beside them.

Checkpoint adapters (`diffusers_folder`, `single_file`) return `LatentDiffusionParts`; they never
build pipelines. The family module (`t2i.systems.stable_diffusion`) turns parts into a pipeline
with its own generation defaults, and hands parts to the exporters (`export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from t2i.autoencoders.kl import AutoencoderKL
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.unet import UNet
from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder

# The key layouts of Stable Diffusion checkpoints, by text encoders: one OpenAI CLIP tower (SD 1.x),
# one OpenCLIP tower (SD 2.x), both (SDXL base), the OpenCLIP one only (SDXL refiner).
LAYOUTS = ("sd1", "sd2", "sdxl", "sdxl_refiner")


@dataclass
class LatentDiffusionParts:
    """The parts of an SD 1.x / 2.x / XL checkpoint.

    layout: one of LAYOUTS. scheduler_class: the diffusers scheduler class the checkpoint names
    (None if it names none). zero_empty_negative: SDXL's `force_zeros_for_empty_prompt`.
    defaults: the generation settings the file stores (sampler, steps, guidance, width, height...;
    empty when it stores none), as plain data: what they mean is the family's business.
    """

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder | SDXLTextEncoder
    schedule: ScheduleConfig
    name: str
    layout: str
    scheduler_class: str | None = None
    zero_empty_negative: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def micro_conditioning(self) -> bool:
        """SDXL's size / crop (or aesthetic score) time ids: the U-Net has their embedding."""
        return self.unet.add_embedding is not None


def text_towers(text_encoder: Any) -> list[CLIPTextEncoder]:
    """The CLIP towers of an SD text encoder, in checkpoint order."""
    if isinstance(text_encoder, CLIPTextEncoder):
        return [text_encoder]
    if isinstance(text_encoder, SDXLTextEncoder):
        return list(text_encoder.encoders)
    raise ValueError(f"cannot export a {type(text_encoder).__name__}: only CLIP-conditioned SD 1/2/XL models")


def text_layout(text_encoder: Any) -> str:
    """The layout from the text encoders: one quick-GELU tower is OpenAI CLIP (SD1), one GELU tower
    OpenCLIP (SD2); SDXL has two, its refiner only the second."""
    towers = text_towers(text_encoder)
    if isinstance(text_encoder, SDXLTextEncoder):
        return "sdxl" if len(towers) == 2 else "sdxl_refiner"
    return "sd2" if towers[0].model.cfg.activation == "gelu" else "sd1"
