"""Train a text-conditional MaskGIT (Chang et al. 2022, sec. 3.1) with the one training loop.

The step function for `t2i.train.fit`: images become (B, N) codes with the frozen VQ tokenizer
(`t2i train vqvae`), each row masks ``ceil(gamma(r) N)`` random positions with r ~ U(0, 1) and the
cosine schedule gamma (`t2i.tokens.sample_training_mask`), and the bidirectional transformer
steps on the cross-entropy of the masked positions only (eq. 1, label smoothing as MaskGIT's
0.1). It cross-attends to the frozen MiniLM states of the captions, 10% of them replaced by the
empty caption so that one network also learns the unconditional model for classifier-free
guidance. The EMA weights, with the tokenizer, are exported as a self-describing
`model.safetensors` (`t2i.systems.maskgit`) and drawn into captioned grids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.autoencoders.tokenizers import kind_of
from t2i.autoencoders.vq import VQAutoencoder
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS
from t2i.systems.maskgit import MaskGITConfig, MaskGITPipeline, load_text_encoder, save_maskgit, text_conditioning
from t2i.tokens import sample_training_mask
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS
from t2i.train.token_models import TokenSetup, TokenTrainConfig, drop_captions, image_codes, token_setup


@dataclass
class MaskGITTrainConfig(TokenTrainConfig):
    """One MaskGIT run (`TokenTrainConfig`'s settings and these)."""

    label_smoothing: float = 0.1
    sample_steps: int = 8  # decoding steps of the grids and the model's default


def resolve_model_config(cfg: MaskGITTrainConfig, vq: VQAutoencoder) -> MaskGITConfig:
    """The model config of a new run: the preset's shape on the tokenizer's codebook and token map."""
    if cfg.net_preset not in TOKEN_TRANSFORMER_PRESETS:
        raise ValueError(f"unknown token transformer preset {cfg.net_preset!r}; "
                         f"choose from {sorted(TOKEN_TRANSFORMER_PRESETS)}")
    grid = vq.cfg.sample_size // vq.cfg.downsample_factor
    top = grid // 2 if kind_of(vq.cfg) == "vqvae2" else 0  # a VQ-VAE-2's top grid, read before the bottom
    net = dataclasses.replace(TOKEN_TRANSFORMER_PRESETS[cfg.net_preset], num_codes=vq.cfg.num_codes, grid=grid,
                              causal=False, context_dim=384, attention=cfg.attention, top_grid=top)
    return MaskGITConfig(net=net, vq=vq.cfg, steps=cfg.sample_steps)


def masked_token_loss(logits: torch.Tensor, codes: torch.Tensor, masked: torch.Tensor,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """MaskGIT eq. 1: mean cross-entropy of the true codes at the masked positions only.
    logits (B, N, V), codes (B, N), masked (B, N) bool."""
    return F.cross_entropy(logits[masked], codes[masked], label_smoothing=label_smoothing)


def mask_codes(codes: torch.Tensor, mask_id: int, gen: torch.Generator, cond: dict[str, Any]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A batch of MaskGIT's training (sec. 3.1): each row of codes (B, N) masks ``ceil(gamma(r) N)``
    random positions (r ~ U(0, 1), cosine gamma; drawn from `gen`). Returns (inputs (B, N) with
    mask_id at the masked positions, codes, masked (B, N) bool, cond), what `masked_token_step` reads."""
    masked = sample_training_mask(codes.shape[0], codes.shape[1], gen)  # (B, N)
    return codes.masked_fill(masked, mask_id), codes, masked, cond


def masked_token_step(t: TokenSetup, batch: tuple[Any, ...], s: Step, label_smoothing: float, name: str,
                      what: str) -> dict[str, float]:
    """One update of a masked token network (MaskGIT's, Muse's super-resolution) on a `mask_codes` batch:
    logits of the inputs under cond, eq. 1's loss, the optimizer step (`what` names the loss in errors).
    Logs `name`/loss, /masked_accuracy (argmax = true code at the masked positions) and /grad_norm."""
    inputs, codes, masked, cond = batch
    logits = t.parallel(inputs, **cond)  # (B, N, V)
    loss = masked_token_loss(logits, codes, masked, label_smoothing)
    gnorm = s.update(loss, t.opt, t.net.parameters(), what)
    with torch.no_grad():
        accuracy = (logits[masked].argmax(-1) == codes[masked]).float().mean().item()
    return {f"{name}/loss": loss.item(), f"{name}/masked_accuracy": accuracy, f"{name}/grad_norm": gnorm}


def build_maskgit(cfg: MaskGITTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    t = token_setup(cfg, run, partial(resolve_model_config, cfg), MaskGITConfig.from_dict, two_grids=True)
    vq, model_cfg, net, ema = t.vq, t.model_cfg, t.net, t.ema
    text = text_encoder or load_text_encoder(model_cfg.text_encoder, model_cfg.text_length)

    def prepare(position: int, gen: torch.Generator) -> tuple[Any, ...]:
        """(inputs (B, N) with [MASK] at the masked positions, codes (B, N), masked (B, N) bool,
        the text conditioning of the captions with caption dropout); all drawn from `gen`."""
        x, captions, _ = t.data.batch(position, cfg.batch_size, run.info)
        codes = image_codes(vq, x)  # (B, N)
        captions = drop_captions(captions, cfg.caption_dropout, gen)
        return mask_codes(codes, model_cfg.net.mask_id, gen, text_conditioning(text, captions))

    def step(batch: tuple[Any, ...], s: Step) -> dict[str, float]:
        return masked_token_step(t, batch, s, cfg.label_smoothing, "maskgit", "MaskGIT loss")

    def export() -> None:
        save_maskgit(ema.averaged, vq, model_cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) from the EMA network with the model's default settings."""
        pipe = MaskGITPipeline(ema.averaged, vq, text, model_cfg, name="ema")
        images = pipe.generate(list(SAMPLE_PROMPTS), seed=0, steps=cfg.sample_steps).sample
        return Grid(pipe.decode_pixels(images), list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in net.parameters())
    about = (f", token transformer {n_params / 1e6:.2f}M parameters on {model_cfg.net.grid}x{model_cfg.net.grid} "
             f"tokens of {model_cfg.net.num_codes} codes (tokenizer {cfg.vqvae})")
    return Task("maskgit", {"net": net, "ema": ema.averaged}, {"opt": t.opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def train_maskgit(cfg: MaskGITTrainConfig, resume: bool = False, resume_lr: float | None = None,
                  text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a MaskGIT training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding; default the config's MiniLM."""
    return fit(cfg, partial(build_maskgit, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr,
               given=given)
