"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder half (conv_in, the down levels, the mid block: sec. 3.2) reads
the noisy latents plus a small convolutional embedding of a conditioning image (an edge map, a
depth map, a pose; sec. 3.3's "tiny network E") and returns one residual per U-Net skip connection and
one for the mid block, each through a zero-initialised 1x1 convolution ("zero convolution", eq. 2),
so an untrained ControlNet leaves the U-Net's output unchanged. The locked U-Net adds them to its skips
(`UNet.forward(..., down_residuals=, mid_residual=)`).

Parameter names equal diffusers' `ControlNetModel`, so its folders load with `load_state_dict(strict=True)`
(`t2i.checkpoints.diffusers_controlnet`). Read top to bottom: config, conditioning embedding, model,
the controlled U-Net a sampler calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.unet import UNet, UNetConfig, UNetEncoder


@dataclass
class ControlNetConfig:
    """A ControlNet: the encoder of a U-Net of config `unet` plus the conditioning embedding.

    Attributes:
        unet: the encoder's shape; it must match the U-Net it controls (widths, levels, context).
        conditioning_channels: channels of the conditioning image (3: RGB in [0, 1]).
        embedding_channels: widths of the conditioning embedding's convolutions; each step after the
            first halves the resolution, so len - 1 halvings must equal the autoencoder's factor (8 for SD).
        bgr: the network was trained on BGR images (diffusers' `controlnet_conditioning_channel_order`).
        global_pool: residuals are averaged over space (diffusers' `global_pool_conditions`, shuffle models).
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False
    global_pool: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):  # a JSON round trip
            self.unet = UNetConfig(**self.unet)
        self.embedding_channels = tuple(self.embedding_channels)
        if not self.embedding_channels:
            raise ValueError("ControlNetConfig.embedding_channels needs at least one width")


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """The paper's zero convolution (eq. 2): weight and bias 0, so the residual starts at 0."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditioningEmbedding(nn.Module):
    """Conditioning image (B, C_img, H, W) -> (B, C0, H / 2^(n-1), W / 2^(n-1)) features at latent size.

    Sec. 3.3: conv_in, then per width step a 3x3 conv and a stride-2 3x3 conv, SiLU after each, and a
    zero-initialised 3x3 output conv (so the copy starts from the U-Net's own input)."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))  # (B, W0, H, W)
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # (B, C0, h, w)


class ControlNet(UNetEncoder):
    """forward(x, t, context, image, scale) -> (down residuals, mid residual), the inputs of
    `UNet.forward(down_residuals=, mid_residual=)`.

    The encoder's parameters are the U-Net's names (`from_unet` copies them, the paper's initialisation);
    `controlnet_cond_embedding`, `controlnet_down_blocks` (one 1x1 zero conv per skip) and
    `controlnet_mid_block` are the new ones.
    """

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__(cfg.unet)
        self.control_cfg = cfg
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.unet.block_channels[0], cfg.conditioning_channels, cfg.embedding_channels)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in self.skip_channels())
        c_mid = cfg.unet.block_channels[-1]
        self.controlnet_mid_block = _zero(nn.Conv2d(c_mid, c_mid, 1))

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_channels: int = 3,
                  embedding_channels: tuple[int, ...] = (16, 32, 96, 256)) -> ControlNet:
        """A ControlNet whose encoder is a copy of `unet`'s (sec. 3.2: the trainable copy starts as the
        locked network), its new layers freshly initialised (zero convs at 0)."""
        # diffusers' ControlNetModel has no guidance-embedding input (an LCM U-Net's time_cond_proj)
        cfg = replace(unet.cfg, time_cond_proj_dim=None)
        net = cls(ControlNetConfig(cfg, conditioning_channels, embedding_channels))
        encoder = {k: v for k, v in unet.state_dict().items() if k in net.state_dict()}
        missing = net.load_state_dict(encoder, strict=False).missing_keys
        assert all(k.startswith("controlnet_") for k in missing), missing
        return net.to(next(unet.parameters()).dtype)

    def controlling(self, net: nn.Module, base: nn.Module, image: torch.Tensor, scale: float = 1.0) -> ControlledUNet:
        """`net` (the U-Net or a wrapper around it) with this ControlNet's residuals added; `base` (the U-Net
        itself) is not needed here: the residuals go in through the U-Net's own inputs. The PixArt ControlNet
        has the same method (`t2i.nets.pixart_controlnet`), so pipelines and training treat both alike."""
        return ControlledUNet(net, self, image, scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, image: torch.Tensor,
                scale: float = 1.0, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B, C_in, h, w) noisy latents; t: (B,) timesteps; context: (B, T, context_dim); image:
        (B, C_img, H, W) conditioning image in [0, 1], H = h * 2^(len(embedding_channels) - 1);
        scale: the conditioning scale every residual is multiplied by; text_embeds, time_ids: SDXL.
        Returns ([(B, C_i, h_i, w_i) per skip], (B, C_last, h_last, w_last))."""
        if self.control_cfg.bgr:
            image = image.flip(1)
        emb = self.embed_time(t, x.shape[0], x.dtype, text_embeds, time_ids)  # (B, temb_dim)
        features = self.controlnet_cond_embedding(image.to(x.dtype))  # (B, C0, h, w)
        h, skips = self.encode(x, emb, context, features)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        down = [conv(s) * scale for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(h) * scale
        if self.control_cfg.global_pool:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def check_fits(control: ControlNetConfig, unet: UNetConfig, latent_channels: int, vae_factor: int) -> None:
    """ValueError naming the first thing in which a ControlNet cannot drive this U-Net (its residuals
    would not add to the skips, or its embedding would not reach the latent size)."""
    c = control.unet
    for name, mine, theirs in (("cross-attention width (context_dim)", c.context_dim, unet.context_dim),
                               ("block channels", c.block_channels, unet.block_channels),
                               ("layers per block", c.layers_per_block, unet.layers_per_block),
                               ("input channels (latent channels)", c.in_channels, latent_channels),
                               ("SDXL micro-conditioning (projection_class_embeddings_input_dim)",
                                c.projection_class_embeddings_input_dim, unet.projection_class_embeddings_input_dim)):
        if mine != theirs:
            raise ValueError(f"the ControlNet does not fit this model: its {name} is {mine}, the U-Net's {theirs}")
    factor = 2 ** (len(control.embedding_channels) - 1)
    if factor != vae_factor:
        raise ValueError(f"the ControlNet's conditioning embedding downsamples by {factor}, "
                         f"the model's autoencoder by {vae_factor}")


class ControlledUNet(nn.Module):
    """The U-Net as a sampler calls it, net(x, t, context=..., ...), with a ControlNet's residuals added.

    image: (1 or B, C_img, H, W) in [0, 1], expanded to the batch: with classifier-free guidance both the
    conditional and the unconditional halves get it (diffusers' pipeline with guess_mode off), each with
    its own text context."""

    def __init__(self, unet: nn.Module, controlnet: ControlNet, image: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.unet, self.controlnet, self.image, self.scale = unet, controlnet, image, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        image = self.image.expand(x.shape[0], -1, -1, -1)
        dtype = next(self.controlnet.parameters()).dtype  # may differ from an int8 U-Net's inputs
        extra = {k: cond[k].to(dtype) for k in ("text_embeds", "time_ids") if k in cond}
        down, mid = self.controlnet(x.to(dtype), t, context.to(dtype), image, self.scale, **extra)
        down, mid = [d.to(x.dtype) for d in down], mid.to(x.dtype)
        return self.unet(x, t, context=context, down_residuals=down, mid_residual=mid, **cond)
