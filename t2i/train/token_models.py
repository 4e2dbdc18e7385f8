"""What the token families' trainings (MaskGIT, DALL-E) share: the run settings, the frozen
tokenizer, the data, the transformer with its EMA copy and optimizer, and caption dropout.

Each family resolves its model config from the tokenizer at the start of a run (saved in the
checkpoint, so `--resume` rebuilds the same network) and writes its own loss, export and grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from t2i.autoencoders.tokenizers import kind_of, load_tokenizer
from t2i.autoencoders.vq import VQAutoencoder
from t2i.nets.token_transformer import TokenTransformer
from t2i.systems.token_models import build_network
from t2i.train.config import LoopConfig
from t2i.train.data import BatchSource, open_data
from t2i.train.ema import EMA
from t2i.train.fit import Run


@dataclass
class TokenTrainConfig(LoopConfig):
    """One token-model run. `model` (the family's resolved config, tokenizer config included) is
    filled in at the start and saved in every checkpoint; the tokenizer's weights are read from
    `vqvae` (and embedded in the exported model)."""

    vqvae: str = ""  # vqvae.safetensors written by `t2i train vqvae`
    net_preset: str = "shapes"  # t2i.nets.token_transformer.TOKEN_TRANSFORMER_PRESETS
    attention: str = "full"  # self-attention mask pattern (t2i.tokens.masks.PATTERNS)
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    data: str = "shapes"
    data_path: str | None = None
    background_p: float | None = None
    steps: int = 3500
    batch_size: int = 32
    lr: float = 4e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    export_every: int = 500
    image_every: int = 500
    model: dict[str, Any] | None = None
    vqvae_digest: str = ""  # of the tokenizer's weights, set at the start: a resumed run must find the same


@dataclass
class TokenSetup:
    """A token run's parts: the frozen tokenizer, the model config, the data, the transformer (and
    the module to call in the step: DDP-wrapped under torchrun), its EMA copy and optimizer."""

    vq: VQAutoencoder
    model_cfg: Any
    data: BatchSource
    net: TokenTransformer
    parallel: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer


def token_setup(cfg: TokenTrainConfig, run: Run, resolve: Callable[[VQAutoencoder], Any],
                from_dict: Callable[[dict[str, Any]], Any], image_size: Callable[[Any], int] | None = None,
                two_grids: bool = False) -> TokenSetup:
    """Load the tokenizer, resolve the model config of a new run (`resolve(tokenizer)`) or read the
    saved one (`from_dict`), and build the rest. AdamW with beta2 = 0.96 (MaskGIT's optimizer).

    image_size: pixels per side of the training images from the model config (default the tokenizer's
    sample_size; Muse's super-resolution draws larger ones). two_grids: the family reads a VQ-VAE-2's
    token sequence (top grid, then bottom); the others refuse one by name."""
    if not cfg.vqvae:
        raise ValueError("--vqvae: the tokenizer file (vqvae.safetensors of `t2i train vqvae`) is required")
    vq = load_tokenizer(cfg.vqvae)
    if kind_of(vq.cfg) == "vqvae2" and not two_grids:
        raise ValueError(f"--vqvae {cfg.vqvae}: a VQ-VAE-2 writes two token grids (top and bottom); this family "
                         "reads one grid (only maskgit reads both): train a vqvae, vqgan, vit-vqgan or dvae tokenizer")
    if cfg.model is None:
        cfg.model = dataclasses.asdict(resolve(vq))
    model_cfg = from_dict(cfg.model)
    digest = weights_digest(vq)
    if model_cfg.vq != vq.cfg or cfg.vqvae_digest not in ("", digest):
        raise ValueError(f"{cfg.vqvae}: not the tokenizer this run was started with (a tokenizer still training "
                         "rewrites its file: train on a copy)")
    cfg.vqvae_digest = digest
    size = vq.cfg.sample_size if image_size is None else image_size(model_cfg)
    data = open_data(cfg.data, cfg.data_path, size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    torch.manual_seed(cfg.seed)  # the network's init must not depend on what loading drew
    net = build_network(model_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.96))
    return TokenSetup(vq, model_cfg, data, net, run.parallel(net), EMA(net, cfg.ema_decay), opt)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes and float32 bytes), to recognise the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def image_codes(vq: VQAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B, N) codes in raster order, N = (H / f) * (W / f)."""
    return vq.encode(x)[0].flatten(1)


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by the empty one with probability p (one draw per caption from `generator`)."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
