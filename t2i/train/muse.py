"""Train Muse's token super-resolution transformer (Chang et al. 2023, sec. 2.4) with the one training loop.

The step function for `t2i.train.fit`: each image is drawn at the super-resolution size (the base's
size times `sr_factor`: 128x128 over a 64x64 MaskGIT base on the shapes world, which renders at any
size); its tokens (B, N) are the target, and the tokens of the same image downsampled by area (B, n),
what the base writes, are the low-res conditioning. Then MaskGIT's training (`t2i.train.maskgit`): the
cosine-schedule mask over the high-res tokens, cross-entropy on the masked positions with label
smoothing, 10% empty captions for classifier-free guidance (the low-res tokens are always given, so
guidance is on the text). The frozen tokenizer is the base's (`--vqvae` must be the file the base was
trained on). Every export bundles the EMA network with the base (`--base`) into one Muse file,
`model.safetensors` (`t2i.systems.muse`), which `t2i generate --model` reads; `bundle_muse` rebundles a
run's file with another base later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.autoencoders.vq import VQAutoencoder
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS
from t2i.systems.maskgit import SYSTEM_NAME as MASKGIT
from t2i.systems.maskgit import MaskGITConfig, load_text_encoder, text_conditioning
from t2i.systems.muse import MuseConfig, MusePipeline, bundle, save_muse, sr_config
from t2i.systems.token_models import load_token_model
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS
from t2i.train.maskgit import MaskGITTrainConfig, mask_codes, masked_token_step
from t2i.train.token_models import drop_captions, image_codes, token_setup, weights_digest


@dataclass
class MuseSRTrainConfig(MaskGITTrainConfig):
    """One super-resolution run (MaskGIT's settings and these). `net_preset` gives the network's shape
    (its grid becomes the base's times `sr_factor`)."""

    base: str = ""  # the MaskGIT model file (`t2i train maskgit`) whose tokens are upsampled
    sr_factor: int = 2  # high-res token grid / the base's
    low_res_layers: int = 2  # self-attention layers over the low-res tokens
    net_preset: str = "shapes_sr"
    batch_size: int = 16


def resolve_model_config(cfg: MuseSRTrainConfig, base: MaskGITConfig, vq: VQAutoencoder) -> MuseConfig:
    """The model config of a new run: the preset's shape at sr_factor times the base's grid."""
    if cfg.net_preset not in TOKEN_TRANSFORMER_PRESETS:
        raise ValueError(f"unknown token transformer preset {cfg.net_preset!r}; "
                         f"choose from {sorted(TOKEN_TRANSFORMER_PRESETS)}")
    if cfg.sr_factor < 2:
        raise ValueError(f"--sr-factor must be at least 2, got {cfg.sr_factor}")
    net = replace(TOKEN_TRANSFORMER_PRESETS[cfg.net_preset], attention=cfg.attention)
    model = sr_config(base, net, cfg.sr_factor, cfg.low_res_layers, cfg.sample_steps)
    size = model.net.grid * vq.cfg.downsample_factor
    with torch.no_grad():
        got = image_codes(vq, torch.zeros(1, 3, size, size)).shape[1]
    if got != model.net.num_tokens:
        raise ValueError(f"--vqvae: this tokenizer writes {got} tokens for a {size}x{size} image, not "
                         f"{model.net.num_tokens}: super-resolution needs one that encodes any size (not ViT-VQGAN)")
    return model


def load_base(cfg: MuseSRTrainConfig) -> tuple[torch.nn.Module, MaskGITConfig, str]:
    """(the base network, its config, its tokenizer's weights digest) from --base."""
    if not cfg.base:
        raise ValueError("--base: the MaskGIT model file (model.safetensors of `t2i train maskgit`) is required")
    net, vq, base_cfg = load_token_model(Path(cfg.base), MASKGIT, "a t2i MaskGIT file", MaskGITConfig.from_dict)
    return net, base_cfg, weights_digest(vq)


def build_muse_sr(cfg: MuseSRTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    base_net, base_cfg, base_vq_digest = load_base(cfg)
    t = token_setup(cfg, run, lambda vq: resolve_model_config(cfg, base_cfg, vq), MuseConfig.from_dict,
                    image_size=lambda m: m.net.grid * m.vq.downsample_factor)  # the data at the high-res size
    vq, model_cfg, net, ema = t.vq, t.model_cfg, t.net, t.ema
    if base_vq_digest != cfg.vqvae_digest or base_net.cfg.num_tokens != model_cfg.low_res.length:
        raise ValueError(f"--base {cfg.base}: not a MaskGIT model on this tokenizer ({cfg.vqvae}) writing the "
                         f"{model_cfg.low_res.length} low-res tokens this run reads")
    text = text_encoder or load_text_encoder(model_cfg.text_encoder, model_cfg.text_length)
    size = model_cfg.net.grid * vq.cfg.downsample_factor

    def prepare(position: int, gen: torch.Generator) -> tuple[Any, ...]:
        """(high-res inputs (B, N) with [MASK] at the masked positions, codes (B, N), masked (B, N) bool,
        cond: the captions' text states with caption dropout and the low-res codes (B, n))."""
        x, captions, _ = t.data.batch(position, cfg.batch_size, run.info)  # (B, 3, S, S)
        codes = image_codes(vq, x)  # (B, N)
        low = image_codes(vq, F.interpolate(x, scale_factor=1 / cfg.sr_factor, mode="area"))  # (B, n)
        cond = {**text_conditioning(text, drop_captions(captions, cfg.caption_dropout, gen)), "low_res": low}
        return mask_codes(codes, model_cfg.net.mask_id, gen, cond)

    def step(batch: tuple[Any, ...], s: Step) -> dict[str, float]:
        return masked_token_step(t, batch, s, cfg.label_smoothing, "muse_sr", "Muse super-resolution loss")

    def bundled() -> MusePipeline:
        full_net, full_cfg = bundle(ema.averaged, model_cfg, base_net)
        return MusePipeline(full_net, vq, text, full_cfg, name="ema")

    def export() -> None:
        pipe = bundled()
        save_muse(pipe.unet, vq, pipe.cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each): the base's tokens upsampled by the EMA network."""
        pipe = bundled()
        images = pipe.generate(list(SAMPLE_PROMPTS), seed=0, steps=cfg.sample_steps).sample
        return Grid(pipe.decode_pixels(images), list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in net.parameters())
    g, lg = model_cfg.net.grid, base_net.cfg.grid
    about = (f", token super-resolution transformer {n_params / 1e6:.2f}M parameters: {lg}x{lg} -> {g}x{g} tokens "
             f"({size}x{size} images) of {model_cfg.net.num_codes} codes (tokenizer {cfg.vqvae}, base {cfg.base})")
    return Task("muse-sr", {"net": net, "ema": ema.averaged}, {"opt": t.opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def train_muse_sr(cfg: MuseSRTrainConfig, resume: bool = False, resume_lr: float | None = None,
                  text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a Muse super-resolution training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding; default the base's MiniLM."""
    return fit(cfg, partial(build_muse_sr, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr,
               given=given)
