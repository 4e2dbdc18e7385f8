"""The CLIP text transformer (Radford et al. 2021), the text encoder of every Stable Diffusion.

A pre-LayerNorm transformer with causal self-attention over 77 tokens and learned positions.
SD 1.x uses OpenAI's ViT-L/14 text tower (quick-GELU, last layer); SD 2.x uses OpenCLIP
ViT-H/14 (GELU, cut to 23 layers in the checkpoint's config); SDXL uses ViT-L/14 and
OpenCLIP ViT-bigG/14, the latter with a `text_projection` giving the pooled embedding.
Parameter names are ours; transformers' names are mapped in `t2i.checkpoints.transformers_text`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.nets.transformer import PreNormBlock


@dataclass
class CLIPTextConfig:
    """Shape of a CLIP text tower. Defaults: SD 1.x (OpenAI ViT-L/14)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP, erf form)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # width of text_projection (SDXL's 2nd encoder: 1280)
    eos_token_id: int = 49407
    # Where `pooled` is read: "argmax" = the position of the largest id (the eos, 49407, in the
    # real vocabulary; transformers' rule for legacy configs with eos_token_id == 2), or
    # "first_eos" = the first position holding eos_token_id.
    pooling: str = "first_eos"


@dataclass
class CLIPTextOutput:
    """hidden_states: embeddings then the output of each layer, each (B, T, D), no final norm.
    last_hidden_state: (B, T, D), final LayerNorm applied. pooled: (B, D) at the eos token.
    text_embeds: (B, P) = text_projection(pooled), only when the config has a projection."""

    hidden_states: tuple[torch.Tensor, ...]
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    text_embeds: torch.Tensor | None


def clip_layer(cfg: CLIPTextConfig) -> PreNormBlock:
    """One layer of the text tower: causal self-attention, so a token sees only those before it."""
    return PreNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.layer_norm_eps, causal=True)


class CLIPTextModel(nn.Module):
    """CLIP text tower: token + position embeddings, causal transformer, final LayerNorm."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        if cfg.pooling not in ("argmax", "first_eos"):
            raise ValueError(f"unknown pooling {cfg.pooling!r}; expected 'argmax' or 'first_eos'")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.layers = nn.ModuleList(clip_layer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = (
            nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None
        )

    def forward(self, ids: torch.Tensor) -> CLIPTextOutput:
        """ids: (B, T) int64 with T <= max_positions. Returns a CLIPTextOutput."""
        B, T = ids.shape
        if T > self.cfg.max_positions:
            raise ValueError(f"{T} tokens exceed the {self.cfg.max_positions} positions of this encoder")
        x = self.token_embedding(ids) + self.position_embedding.weight[:T]  # (B, T, D)
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        last = self.final_norm(x)  # (B, T, D)
        pooled = last[torch.arange(B, device=ids.device), self.eos_positions(ids)]  # (B, D)
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None  # (B, P)
        return CLIPTextOutput(tuple(hidden), last, pooled, text_embeds)

    def eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of the token whose state is pooled (see CLIPTextConfig.pooling).

        argmax returns the first maximum, so padding with eos still picks the first eos.
        """
        if self.cfg.pooling == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.cfg.eos_token_id).int().argmax(dim=-1)


# Named presets: the towers of the released Stable Diffusion checkpoints, as their published
# text_encoder(_2)/config.json files translate (those say eos_token_id 2, hence argmax pooling).
_RELEASED = {"eos_token_id": 2, "pooling": "argmax"}
CLIP_TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    "openai-vit-l-14": CLIPTextConfig(**_RELEASED),  # SD 1.x, SDXL encoder 1
    # SD 2.x: OpenCLIP ViT-H/14 with its last of 24 layers dropped, as the checkpoints ship it.
    "openclip-vit-h-14-sd2": CLIPTextConfig(
        width=1024, layers=23, heads=16, mlp_dim=4096, activation="gelu", projection_dim=None, **_RELEASED
    ),
    "openclip-vit-bigg-14": CLIPTextConfig(  # SDXL encoder 2 (base and refiner)
        width=1280, layers=32, heads=20, mlp_dim=5120, activation="gelu", projection_dim=1280, **_RELEASED
    ),
}
