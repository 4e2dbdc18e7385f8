"""The original (CompVis / Stability AI) key layout of single-file Stable Diffusion checkpoints.

One `.safetensors` (or `.ckpt`) holds the whole pipeline under these prefixes:

    model.diffusion_model.*                 U-Net (input_blocks / middle_block / output_blocks)
    first_stage_model.*                     KL autoencoder (encoder.down.i.block.j, mid.attn_1 ...)
    cond_stage_model.transformer.*          SD 1.x: OpenAI CLIP ViT-L/14, transformers layout
    cond_stage_model.model.*                SD 2.x: OpenCLIP ViT-H/14 (in_proj_weight, resblocks)
    conditioner.embedders.0.transformer.*   SDXL base: CLIP ViT-L/14, transformers layout
    conditioner.embedders.1.model.*         SDXL base: OpenCLIP ViT-bigG/14
    conditioner.embedders.0.model.*         SDXL refiner: OpenCLIP ViT-bigG/14 only

Key maps are data (module pairs built from the config) applied by one small function in each
direction; nothing outside `checkpoints/` knows these names. Every function here only renames
(and reshapes): it runs as well on meta tensors, so a file's keys and shapes are checked against
a config before its weights are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from t2i.autoencoders.kl import AutoencoderKLConfig
from t2i.checkpoints.io import CheckpointError
from t2i.checkpoints.openclip import openclip_from_ours, openclip_to_ours
from t2i.checkpoints.transformers_text import clip_state_dict_from_transformers, clip_state_dict_to_transformers
from t2i.nets.unet import UNetConfig
from t2i.text.clip import CLIPTextConfig
from t2i.text.clip_tokenizer import EOS

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder lives in a single file and how it is read.

    layout: "hf" (transformers CLIP names under `text_model.`) or "openclip".
    pad_token: the tokenizer's padding ("!" for OpenCLIP-trained towers).
    cut_last: the file holds one layer more than is used (SD2 reads the penultimate).
    """

    prefix: str
    layout: str
    pad_token: str
    cut_last: bool = False


TEXT_SLOTS: dict[str, tuple[TextSlot, ...]] = {
    "sd1": (TextSlot("cond_stage_model.transformer.", "hf", EOS),),
    "sd2": (TextSlot("cond_stage_model.model.", "openclip", "!", cut_last=True),),
    "sdxl": (TextSlot("conditioner.embedders.0.transformer.", "hf", EOS),
             TextSlot("conditioner.embedders.1.model.", "openclip", "!")),
    "sdxl_refiner": (TextSlot("conditioner.embedders.0.model.", "openclip", "!"),),
}

# ============================================================================ key-map engine
# A table is a list of module pairs (original name, t2i/diffusers name, renames inside the
# module). A parameter key is split at its longest module prefix found in the table; the rest
# passes through unchanged, or through `renames` (sub-module names) when the pair has any.

Renames = tuple[tuple[str, str], ...]
ModulePair = tuple[str, str, Renames]


def _translate(state: dict[str, torch.Tensor], pairs: list[ModulePair], src: int,
               what: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` from side `src` (0 = original layout, 1 = ours) to the other.
    Unknown keys raise a CheckpointError listing them: a silent drop would load random weights."""
    dst = 1 - src
    index = {p[src]: p for p in pairs}
    out, unknown = {}, []
    for key, value in state.items():
        parts = key.split(".")
        pair = None
        for i in range(len(parts) - 1, 0, -1):
            pair = index.get(".".join(parts[:i]))
            if pair is not None:
                break
        if pair is None:
            unknown.append(key)
            continue
        rest = ".".join(parts[i:])
        if pair[2]:
            module, _, leaf = rest.rpartition(".")
            sub = {r[src]: r[dst] for r in pair[2]}.get(module)
            if sub is None:
                unknown.append(key)
                continue
            rest = f"{sub}.{leaf}"
        out[f"{pair[dst]}.{rest}"] = value
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} keys do not fit the layout, e.g. {unknown[:5]}")
    return out


# ============================================================================ U-Net

UNET_RESNET: Renames = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                        ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
UNET_TOP: list[ModulePair] = [
    ("time_embed.0", "time_embedding.linear_1", ()), ("time_embed.2", "time_embedding.linear_2", ()),
    ("label_emb.0.0", "add_embedding.linear_1", ()), ("label_emb.0.2", "add_embedding.linear_2", ()),
    ("input_blocks.0.0", "conv_in", ()), ("out.0", "conv_norm_out", ()), ("out.2", "conv_out", ()),
]


def unet_module_pairs(cfg: UNetConfig) -> list[ModulePair]:
    """The U-Net's module pairs. The original numbers its blocks sequentially: input block 0 is
    conv_in, then per level `layers` x (ResBlock [, SpatialTransformer]) and a downsampler
    (`.0.op`) between levels; the middle block is ResBlock, [transformer,] ResBlock; output
    blocks run per up level `layers + 1` x (ResBlock [, transformer]) with the upsampler
    appended to the last one of each level but the top (`.1.conv` or `.2.conv`)."""
    pairs = list(UNET_TOP)
    n_levels = len(cfg.block_channels)
    k = 1
    for level in range(n_levels):
        for j in range(cfg.layers_per_block[level]):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET))
            if cfg.attention[level]:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", ()))
            k += 1
        if level < n_levels - 1:
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", ()))
            k += 1
    if cfg.mid_block:
        mid = ["resnets.0", "attentions.0", "resnets.1"] if cfg.mid_attention else ["resnets.0"]
        for m, name in enumerate(mid):
            pairs.append((f"middle_block.{m}", f"mid_block.{name}", UNET_RESNET if "resnets" in name else ()))
    k = 0
    for i in range(n_levels):
        level = n_levels - 1 - i
        n = cfg.layers_per_block[level] + 1
        for j in range(n):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", UNET_RESNET))
            if cfg.attention[level]:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", ()))
            if j == n - 1 and i < n_levels - 1:
                slot = 2 if cfg.attention[level] else 1
                pairs.append((f"output_blocks.{k}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv", ()))
            k += 1
    return pairs


def unet_to_original(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our (= diffusers') U-Net keys -> original keys, without the `model.diffusion_model.` prefix."""
    return _translate(state, unet_module_pairs(cfg), src=1, what="U-Net")


def unet_from_original(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Original U-Net keys (prefix removed) -> ours."""
    return _translate(state, unet_module_pairs(cfg), src=0, what="U-Net")


# ============================================================================ autoencoder

VAE_RESNET: Renames = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                       ("nin_shortcut", "conv_shortcut"))
# The original attention uses 1x1 convolutions for q, k, v and the output; ours are Linear.
VAE_ATTENTION: Renames = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                          ("proj_out", "to_out.0"))
_VAE_CONV_WEIGHTS = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_module_pairs(cfg: AutoencoderKLConfig) -> list[ModulePair]:
    """Encoder levels count up (`down.i`); the original decoder also indexes `up.i` from the
    lowest resolution's *opposite* end: its up.(L-1-i) is our up_blocks.i."""
    pairs: list[ModulePair] = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    n = len(cfg.block_channels)
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in", ()), (f"{side}.conv_out", f"{side}.conv_out", ()),
                  (f"{side}.norm_out", f"{side}.conv_norm_out", ()),
                  (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET),
                  (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET)]
        if cfg.mid_attention:
            pairs.append((f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION))
    for i in range(n):
        for j in range(cfg.layers_per_block):
            pairs.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET))
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ()))
        up = n - 1 - i
        for j in range(cfg.layers_per_block + 1):
            pairs.append((f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET))
        if i < n - 1:
            pairs.append((f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", ()))
    return pairs


def vae_to_original(state: dict[str, torch.Tensor], cfg: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    """Our (= diffusers') autoencoder keys -> original keys (no `first_stage_model.` prefix)."""
    state = {k: v[:, :, None, None] if _VAE_CONV_WEIGHTS.search(k) and v.ndim == 2 else v
             for k, v in state.items()}  # (C, C) -> (C, C, 1, 1)
    return _translate(state, vae_module_pairs(cfg), src=1, what="autoencoder")


def vae_from_original(state: dict[str, torch.Tensor], cfg: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    out = _translate(state, vae_module_pairs(cfg), src=0, what="autoencoder")
    return {k: v.flatten(1) if _VAE_CONV_WEIGHTS.search(k) and v.ndim > 2 else v for k, v in out.items()}


# ============================================================================ text encoders


def text_to_ours(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """One text encoder's keys (slot prefix removed) -> our CLIPTextModel keys."""
    if layout == "openclip":
        return openclip_to_ours(state)
    return clip_state_dict_from_transformers(state)


def text_from_ours(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "openclip":
        return openclip_from_ours(state)
    return clip_state_dict_to_transformers(state, prefixed=True)


def split_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def indices(keys: list[str], pattern: str) -> list[int]:
    """The sorted distinct numbers that `pattern`'s group 1 matches in `keys` (block indices)."""
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def text_state(state: dict[str, torch.Tensor], slot: TextSlot, cfg: CLIPTextConfig | None) -> dict[str, torch.Tensor]:
    """One text encoder's weights under our keys, cut to the layers the config uses (SD2's file
    holds one more than it reads) and without a projection the config does not have."""
    ours = text_to_ours(split_prefix(state, slot.prefix), slot.layout)
    n = len(indices(list(ours), r"layers\.(\d+)\."))
    keep = cfg.layers if cfg is not None else n - int(slot.cut_last)
    has_projection = cfg.projection_dim is not None if cfg is not None else not slot.cut_last
    return {k: v for k, v in ours.items()
            if not (k.startswith("layers.") and int(k.split(".")[1]) >= keep)
            and (has_projection or not k.startswith("text_projection"))}
