"""The image tokenizers by kind: their configs, networks, presets and files, in one table.

Every tokenizer turns images into integer codes and back with the same calls, so a token model
(MaskGIT, DALL-E, ...) can sit on any of them:

    codes, z_q = tok.encode(x)        # x (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64
    x_hat = tok.decode_codes(codes)   # = tok.decode(tok.quantize.lookup(codes))
    tok.cfg.num_codes, tok.cfg.downsample_factor, tok.cfg.sample_size
    x_hat, q = tok(x, generator)      # training: q.commitment (the quantizer's loss term),
                                      # q.perplexity, q.dead_codes

VQ-VAE-2 is the exception in one respect: its codes are one (B, N) sequence (top grid, then bottom
grid offset by the top codebook, `t2i.autoencoders.vqvae2`), decoded by `decode_codes`.

A file is self-describing: its `t2i_system` metadata names the network and its `t2i_config` holds the
config (with a `kind` field, except the VQ-VAE's, whose files predate the others). A VQGAN is a
VQ-VAE network trained with the VQGAN objective, so its file is a VQ-VAE file: everything that reads
one (the token families' `--vqvae`) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from t2i.autoencoders.dvae import DVAE, DVAE_CONFIGS, DVAEConfig
from t2i.autoencoders.vit_vqgan import VIT_VQGAN_CONFIGS, ViTVQGAN, ViTVQGANConfig
from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.autoencoders.vqvae2 import VQVAE2, VQVAE2_CONFIGS, VQVAE2Config
from t2i.checkpoints.io import read_config, save_module
from t2i.checkpoints.limits import load_checked_file


@dataclass(frozen=True)
class TokenizerKind:
    """system: the files' t2i_system; config / network: the classes; presets: named shapes;
    gan: trained with the VQGAN objective (`t2i.autoencoders.vqgan`) rather than reconstruction alone."""

    system: str
    config: type
    network: type[nn.Module]
    presets: dict[str, Any]
    gan: bool = False

    @property
    def description(self) -> str:
        return {"vq_autoencoder": "a VQ autoencoder file", "vit_vqgan": "a ViT-VQGAN file", "dvae": "a dVAE file",
                "vqvae2": "a VQ-VAE-2 file"}[self.system]


KINDS: dict[str, TokenizerKind] = {
    "vqvae": TokenizerKind("vq_autoencoder", VQAutoencoderConfig, VQAutoencoder, VQ_CONFIGS),
    "vqgan": TokenizerKind("vq_autoencoder", VQAutoencoderConfig, VQAutoencoder, VQ_CONFIGS, gan=True),
    "vit-vqgan": TokenizerKind("vit_vqgan", ViTVQGANConfig, ViTVQGAN, VIT_VQGAN_CONFIGS, gan=True),
    "dvae": TokenizerKind("dvae", DVAEConfig, DVAE, DVAE_CONFIGS),
    "vqvae2": TokenizerKind("vqvae2", VQVAE2Config, VQVAE2, VQVAE2_CONFIGS),
}
# The kind a file's t2i_system is read back as (a VQGAN file reads as the VQ-VAE network it is).
BY_SYSTEM = {"vq_autoencoder": "vqvae", "vit_vqgan": "vit-vqgan", "dvae": "dvae", "vqvae2": "vqvae2"}


def kind_of(cfg: Any) -> str:
    """The network kind of a tokenizer config ("vqvae" for the VQ-VAE's, which has no `kind` field)."""
    return getattr(cfg, "kind", "vqvae")


def tokenizer_config_from_dict(d: dict[str, Any]) -> Any:
    """A saved tokenizer config (e.g. a token model's `vq` entry) as its dataclass, by its `kind`."""
    kind = d.get("kind", "vqvae")
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind].config(**d)


def build_tokenizer(cfg: Any) -> nn.Module:
    """The network of a tokenizer config, by its kind."""
    return KINDS[kind_of(cfg)].network(cfg)


def save_tokenizer(model: nn.Module, path: str | Path) -> None:
    """Weights (float32, codebook statistics included) and the config in the metadata."""
    save_module(model, path, KINDS[kind_of(model.cfg)].system)


def load_tokenizer(path: str | Path) -> nn.Module:
    """Any tokenizer file written by `save_tokenizer` (or `t2i.train.vqvae.save_vqvae`), by the kind its
    metadata names; checked before allocating, frozen, eval mode."""
    read_config(path, "a tokenizer file")  # a readable safetensors file with a t2i config, or a clear error
    with safe_open(str(path), framework="pt") as f:
        system = (f.metadata() or {}).get("t2i_system")
    if system not in BY_SYSTEM:
        raise ValueError(f"{path}: not a tokenizer file (its t2i_system is {system!r}; tokenizers: "
                         f"{', '.join(BY_SYSTEM)})")
    k = KINDS[BY_SYSTEM[system]]
    return load_checked_file(path, k.system, k.description, k.config, k.network)


def round_trip(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) -> decode_codes(encode(x)): what a token model's codes of x would draw."""
    return decode_tokens(model, model.encode(x)[0].flatten(1), *x.shape[-2:])


def decode_tokens(model: nn.Module, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N) tokens in a token model's order (raster order of the grid; a VQ-VAE-2's top grid then
    bottom grid) -> images (B, 3, height, width)."""
    if isinstance(model, VQVAE2):  # a token sequence: its grids' sizes come from the image's
        return model.decode_codes(tokens, height, width)
    f = model.cfg.downsample_factor
    return model.decode_codes(tokens.view(-1, height // f, width // f))


def allowed_codes(cfg: Any, height: int, width: int) -> torch.Tensor | None:
    """(N, num_codes) bool: the codes each token position of a height x width image can hold; None
    where every position takes every code (one grid). A VQ-VAE-2's sequence keeps each grid to its
    own codebook (`VQVAE2Config.allowed_codes`)."""
    return cfg.allowed_codes(height, width) if kind_of(cfg) == "vqvae2" else None


def dead_codes(model: nn.Module) -> int:
    """Codes the saved usage statistics count as dead (EMA usage below the restart threshold), over
    every codebook of the model: `cluster_size` of the EMA codebooks, `usage` of the others."""
    n = 0
    for m in model.modules():
        usage = getattr(m, "cluster_size", None) if hasattr(m, "cluster_size") else getattr(m, "usage", None)
        if isinstance(usage, torch.Tensor) and hasattr(m, "dead_threshold"):
            n += int((usage < m.dead_threshold).sum())
    return n
