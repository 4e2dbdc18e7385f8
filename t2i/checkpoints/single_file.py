"""Loading a single-file Stable Diffusion checkpoint (SD 1.x / 2.x / XL base, refiner, inpainting).

The file's key layout is in `sd_keys`, how its configs are found in `single_file_config`; this
module reads the file and returns `LatentDiffusionParts` (never a pipeline: the family module
`t2i.systems.stable_diffusion` builds that). The order keeps crafted files cheap: the file is read
(safetensors header checked first, pickles only with `weights_only`), the configs are resolved and
checked against sane bounds and the file's tensor count, every network is built on the meta device
and its names and shapes compared with the file's tensors, and only then are the weights assigned
(no copy, no random init).

SD 2.x reads OpenCLIP's penultimate layer: released files hold 24 resblocks and the 24th is
dropped on load (as diffusers does). Our exporter writes the 23 used layers plus an all-zero
24th, which is an exact identity block (pre-norm residual: every branch outputs zero), so any
tool reading "the penultimate of 24" computes what we compute.
Tokenizer: single files carry none; the CLIP vocabulary shipped in t2i/assets/clip is used
(`CLIPTokenizer.default()`), padding with "!" for OpenCLIP towers (SD2, SDXL's 2nd encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.io import PICKLE_SUFFIXES, CheckpointError, load_state_dict
from t2i.checkpoints.limits import build_checked, check_config, check_schedule, fill
from t2i.checkpoints.parts import LatentDiffusionParts
from t2i.checkpoints.sd_keys import (
    TEXT_SLOTS,
    UNET_PREFIX,
    VAE_PREFIX,
    split_prefix,
    text_state,
    unet_from_original,
    vae_from_original,
)
from t2i.checkpoints.single_file_config import SingleFileConfig, resolve_config
from t2i.compact import compact_, loading_cast
from t2i.nets.unet import UNet
from t2i.text.clip import CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder


def _network(build: Callable[[Any], torch.nn.Module], cfg: Any, state: dict[str, torch.Tensor],
             dtype: torch.dtype, what: str, compact: torch.dtype | None = None, keep_first: bool = True) -> Any:
    """Build on the meta device, check against the mapped weights, assign them (cast to dtype; with
    `compact`, as read: `t2i.compact`)."""
    module = fill(build_checked(lambda: build(cfg), {"config": cfg}, state, what), state,
                  dtype if compact is None else None)
    return module if compact is None else compact_(module, compact, keep_first=keep_first)


def parts_from_state_dict(state: dict[str, torch.Tensor], cfg: SingleFileConfig, dtype: torch.dtype | None = None,
                          name: str = "model", compact: torch.dtype | None = None) -> LatentDiffusionParts:
    """The parts of an SD checkpoint from its original-layout weights and their resolved config.

    dtype None keeps the dtype the U-Net weights are stored in. compact (a 16-bit dtype, dtype
    float32): `state` was read with `t2i.compact.compact_cast` and every network is compact."""
    loading_cast(compact, dtype)  # refuses a compact load that does not compute in float32
    slots = TEXT_SLOTS[cfg.family]
    if len(cfg.text) != len(slots) or len(cfg.pad_tokens) != len(slots):
        raise CheckpointError(f"{name}: {len(cfg.text)} text encoder configs for a {cfg.family} model")
    check_schedule(cfg.schedule, f"{name}: schedule")
    unet_orig, vae_orig = split_prefix(state, UNET_PREFIX), split_prefix(state, VAE_PREFIX)
    # The key maps are built from the configs: bound them before the maps are.
    check_config(cfg.unet, f"{name}: U-Net config", len(unet_orig))
    check_config(cfg.vae, f"{name}: autoencoder config", len(vae_orig))
    for slot, tcfg in zip(slots, cfg.text, strict=True):
        check_config(tcfg, f"{name}: text encoder config", len(split_prefix(state, slot.prefix)))
    unet_state = unet_from_original(unet_orig, cfg.unet)
    if dtype is None:
        dtype = next(iter(unet_state.values())).dtype
    unet = _network(UNet, cfg.unet, unet_state, dtype, f"{name}: U-Net", compact)
    vae = _network(AutoencoderKL, cfg.vae, vae_from_original(vae_orig, cfg.vae), dtype, f"{name}: autoencoder",
                   compact)
    encoders = []
    for i, (slot, tcfg, pad) in enumerate(zip(slots, cfg.text, cfg.pad_tokens, strict=True)):
        model = _network(CLIPTextModel, tcfg, text_state(state, slot, tcfg), dtype, f"{name}: text encoder {i}",
                         compact, keep_first=False)  # nothing reads a text model's dtype
        if cfg.family in ("sd1", "sd2"):
            encoders.append(CLIPTextEncoder(CLIPTokenizer.default(pad), model, "last"))
        else:
            pooled = "text_embeds" if i == len(slots) - 1 else "none"
            encoders.append(CLIPTextEncoder(CLIPTokenizer.default(pad), model, "penultimate", pooled))
    text_encoder = encoders[0] if cfg.family in ("sd1", "sd2") else SDXLTextEncoder(encoders)
    return LatentDiffusionParts(unet, vae, text_encoder, cfg.schedule, name, cfg.family, cfg.scheduler_class,
                                cfg.zero_empty_negative, dict(cfg.defaults))


def load_single_file(path: str | Path, *, prediction: str | None = None, config: str | Path | None = None,
                     dtype: torch.dtype | None = torch.float32,
                     compact: torch.dtype | None = None) -> LatentDiffusionParts:
    """A single-file SD 1.x / 2.x / XL (base, refiner, inpainting) checkpoint -> its parts.

    Args:
        path: `.safetensors`, or `.ckpt`/`.pt`/`.bin` (read with `torch.load(weights_only=True)`).
        prediction: "epsilon" or "v_prediction", overriding every other source.
        config: a diffusers folder whose config.json files describe the nets (needed for
            models whose head counts or GroupNorm groups differ from the released ones).
        dtype: weights dtype; None keeps the file's.
        compact: a 16-bit dtype: the weights read tensor by tensor into compact storage, float32
            compute (`t2i.compact`; dtype must be float32).
    """
    path = Path(path)
    state = load_state_dict(path, cast=loading_cast(compact, dtype))
    cfg = resolve_config(state, path, prediction, config)
    return parts_from_state_dict(state, cfg, dtype, name=path.stem, compact=compact)


def is_single_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix in (".safetensors", *PICKLE_SUFFIXES)
