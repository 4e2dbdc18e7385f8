"""PixArt-delta's ControlNet-Transformer (Chen et al. 2024, "PixArt-delta: Fast and Controllable Image
Generation with Latent Consistency Models", sec. 3.2 and Fig. 3 right).

The U-Net ControlNet (`t2i.nets.controlnet`) copies an encoder whose skips the decoder reads; a DiT has no
encoder-decoder split, so PixArt-delta copies the first N transformer blocks instead. The conditioning
image, VAE-encoded like the image latents, goes through the base network's own (frozen) patch embedding and
position embedding; a zero-initialised linear layer (`before_proj`) adds it to the output of base block 0,
which the trainable copy of block 0 reads. Copy i reads copy i-1's output. Each copy's output goes through
its own zero-initialised linear layer (`after_proj[i]`) and is added to the output of base block i, which is
what base block i+1 reads. With every zero layer at 0 the controlled network computes the base network's
output exactly; training (the base frozen) moves only the copies and the zero layers. This is the paper's
code (`ControlPixArtHalf`, `ControlT2IDitBlockHalf`), N = 13 of PixArt-XL's 28 blocks there.

The base `DiT` is left untouched: `ControlledDiT` adds the residuals through forward hooks on the first N
base blocks for the duration of one call, so any wrapper around the DiT (bf16 casting, learned-variance
split, guidance) runs unchanged. Read top to bottom: config, network, the controlled DiT a sampler calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from t2i.nets.dit import DiT, DiTBlock, DiTConfig


@dataclass
class PixArtControlNetConfig:
    """A PixArt ControlNet for base networks of shape `net` (widths, heads and caption width must match).

    Attributes:
        net: the base network's config (its blocks are what the copies copy).
        blocks: N, the trainable copies of the first N base blocks (PixArt-delta: 13 of 28).
    """

    net: DiTConfig
    blocks: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.net, dict):  # a JSON round trip
            self.net = DiTConfig(**self.net)
        if not 1 <= self.blocks <= self.net.layers:
            raise ValueError(f"a PixArt ControlNet copies 1 to {self.net.layers} blocks of its base, not {self.blocks}")


def _zero(linear: nn.Linear) -> nn.Linear:
    """A zero linear layer (the ControlNet's zero convolution as a token-wise map): its output starts at 0."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class PixArtControlNet(nn.Module):
    """The trainable copies and their zero layers; `residual` is one step of the control branch and
    `controlling` wraps a base network for a sampler or a loss."""

    def __init__(self, cfg: PixArtControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.net.width
        self.before_proj = _zero(nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg.net) for _ in range(cfg.blocks))
        self.after_proj = nn.ModuleList(_zero(nn.Linear(d, d)) for _ in range(cfg.blocks))

    @classmethod
    def from_dit(cls, dit: DiT, blocks: int) -> PixArtControlNet:
        """Copies of `dit`'s first `blocks` blocks (the paper's initialisation), zero layers at 0."""
        net = cls(PixArtControlNetConfig(replace(dit.cfg), blocks))
        for copy, base in zip(net.blocks, dit.blocks, strict=False):
            copy.load_state_dict(base.state_dict())
        return net.to(next(dit.parameters()).dtype)

    def control_tokens(self, dit: DiT, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) conditioning latents -> (B, N, D) tokens through the base's frozen patch embedding
        and position embedding (the paper reuses the base's `x_embedder`)."""
        tokens = dit.patch_embed(latents.to(dit.patch_embed.weight.dtype))  # (B, D, gh, gw)
        gh, gw = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        return tokens + dit.position_embedding(gh, gw, tokens)

    def residual(self, i: int, base_out: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                 context: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy i on the control branch: base_out (B, N, D) the output of base block i; h (B, N, D) the control
        tokens (i = 0) or copy i-1's output; c, context, mask as base block i received them.
        Returns (copy i's output (B, N, D), the residual after_proj[i] of it, added to base_out)."""
        dtype = self.before_proj.weight.dtype
        x = base_out.to(dtype) + self.before_proj(h.to(dtype)) if i == 0 else h
        x = self.blocks[i](x, c.to(dtype), None if context is None else context.to(dtype), mask)
        return x, self.after_proj[i](x)

    def controlling(self, net: Callable, dit: DiT, latents: torch.Tensor, scale: float = 1.0) -> ControlledDiT:
        """`net` (the DiT or a wrapper around it, called as net(x, t, **cond)) with this ControlNet's residuals
        added to `dit`'s blocks; latents (1 or B, C, h, w): the VAE-encoded conditioning image."""
        return ControlledDiT(net, dit, self, latents, scale)


def check_fits(control: PixArtControlNetConfig, net: DiTConfig) -> None:
    """ValueError naming the first thing in which a PixArt ControlNet cannot drive this network."""
    c = control.net
    for name, mine, theirs in (("width", c.width, net.width), ("heads", c.heads, net.heads),
                               ("MLP width", c.mlp_dim, net.mlp_dim), ("caption width", c.caption_dim, net.caption_dim),
                               ("adaLN kind", c.adaln, net.adaln), ("patch size", c.patch_size, net.patch_size),
                               ("latent channels", c.in_channels, net.in_channels)):
        if mine != theirs:
            raise ValueError(f"the PixArt ControlNet does not fit this model: its {name} is {mine}, the network's "
                             f"{theirs}")
    if control.blocks > net.layers:
        raise ValueError(f"the PixArt ControlNet copies {control.blocks} blocks; the network has {net.layers}")


class ControlledDiT(nn.Module):
    """net(x, t, **cond) with the control branch's residuals added to the first N blocks of `dit`.

    latents: (1 or B, C, h, w) the conditioning image's latents, expanded to the batch: with classifier-free
    guidance both halves get it (as the U-Net ControlNet does with guess mode off)."""

    def __init__(self, net: Callable, dit: DiT, controlnet: PixArtControlNet, latents: torch.Tensor,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.dit, self.controlnet, self.latents, self.scale = net, dit, controlnet, latents, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        control = self.controlnet.control_tokens(self.dit, self.latents)  # (1 or B, N, D)
        state: dict[str, torch.Tensor] = {}

        def hook(i: int) -> Callable:
            def add_residual(block: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                _, c, context, mask = (*args, None, None)[:4]  # DiTBlock(x, c, context, mask)
                h = control.expand(out.shape[0], -1, -1) if i == 0 else state["h"]
                state["h"], skip = self.controlnet.residual(i, out, h, c, context, mask)
                return out + skip.to(out.dtype) * self.scale
            return add_residual

        handles = [self.dit.blocks[i].register_forward_hook(hook(i)) for i in range(self.controlnet.cfg.blocks)]
        try:
            return self.net(x, t, **cond)
        finally:
            for handle in handles:
                handle.remove()
