"""diffusers' `AmusedPipeline` folders (aMUSEd-256 / -512, Patil et al. 2024) as t2i parts, and back.

A folder holds
    model_index.json   `_class_name` "AmusedPipeline"
    transformer/       UVit2DModel: config.json + diffusion_pytorch_model.* (`t2i.nets.uvit2d`)
    vqvae/             VQModel (`t2i.checkpoints.diffusers_vq`)
    text_encoder/      CLIPTextModelWithProjection (transformers layout)
    tokenizer/         CLIPTokenizer
    scheduler/         AmusedScheduler: mask_token_id, masking_schedule ("cosine" / "linear")

The transformer's parameter names are diffusers' but for the GEGLU feed-forward of its layers
(`ff.net.0.proj` / `ff.net.2` there, `ff.0.proj` / `ff.1` here). Nothing here builds a pipeline:
`t2i.systems.amused` does.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.vq import VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.diffusers_folder import file_tensors, is_diffusers_folder, read_config_file
from t2i.checkpoints.diffusers_nets import check_unsupported, vae_config_to_diffusers
from t2i.checkpoints.diffusers_vq import load_diffusers_vq
from t2i.checkpoints.io import CheckpointError, find_weights, load_state_dict, read_json_object, save_state_dict
from t2i.checkpoints.limits import build_checked, fill
from t2i.checkpoints.transformers_text import (
    clip_config_to_transformers,
    clip_state_dict_to_transformers,
    load_clip_text_folder,
)
from t2i.nets.uvit2d import NUM_MICRO_CONDS, UVit2DConfig, UVit2DModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder

PIPELINE_CLASS = "AmusedPipeline"
MASK_SCHEDULES = ("cosine", "linear")

# our field <- diffusers' UVit2DModel config key, with diffusers' default
_UVIT_FIELDS: dict[str, tuple[str, Any]] = {
    "width": ("hidden_size", 1024),
    "layers": ("num_hidden_layers", 22),
    "heads": ("num_attention_heads", 16),
    "mlp_dim": ("intermediate_size", 2816),
    "use_bias": ("use_bias", False),
    "text_dim": ("encoder_hidden_size", 768),
    "pooled_dim": ("cond_embed_dim", 768),
    "micro_cond_dim": ("micro_cond_encode_dim", 256),
    "vocab_size": ("vocab_size", 8256),
    "codebook_size": ("codebook_size", 8192),
    "embed_dim": ("in_channels", 768),
    "channels": ("block_out_channels", 768),
    "res_blocks": ("num_res_blocks", 3),
    "block_heads": ("block_num_heads", 12),
    "downsample": ("downsample", False),
    "upsample": ("upsample", False),
    "eps": ("layer_norm_eps", 1e-6),
    "affine": ("ln_elementwise_affine", True),
    "sample_size": ("sample_size", 64),
}
# dropout only acts in training, which t2i does not do on this layout: only 0 is taken
_UVIT_UNSUPPORTED = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
# transformer_layers.N.ff.net.0.proj.* <-> transformer_layers.N.ff.0.proj.*, ff.net.2.* <-> ff.1.*
_FF_FROM = [(re.compile(r"\.ff\.net\.0\.proj\."), ".ff.0.proj."), (re.compile(r"\.ff\.net\.2\."), ".ff.1.")]
_FF_TO = [(re.compile(r"\.ff\.0\.proj\."), ".ff.net.0.proj."), (re.compile(r"\.ff\.1\."), ".ff.net.2.")]


def uvit_config_from_diffusers(cfg: dict[str, Any]) -> UVit2DConfig:
    """UVit2DConfig from a diffusers `transformer/config.json` dict; ValueError names what is unsupported."""
    check_unsupported(cfg, _UVIT_UNSUPPORTED, "UVit2DModel config")
    values = {ours: cfg.get(key, default) for ours, (key, default) in _UVIT_FIELDS.items()}
    micro = cfg.get("micro_cond_embed_dim", 1280)
    if micro != NUM_MICRO_CONDS * values["micro_cond_dim"]:
        raise ValueError(f"UVit2DModel config: micro_cond_embed_dim={micro} is not {NUM_MICRO_CONDS} x "
                         f"micro_cond_encode_dim={values['micro_cond_dim']} (the pipeline's {NUM_MICRO_CONDS} "
                         "micro-conditions)")
    return UVit2DConfig(**values)


def uvit_config_to_diffusers(cfg: UVit2DConfig) -> dict[str, Any]:
    """The diffusers `transformer/config.json` dict describing the same network."""
    out: dict[str, Any] = {"_class_name": "UVit2DModel"}
    out.update({key: getattr(cfg, ours) for ours, (key, _) in _UVIT_FIELDS.items()})
    out.update(micro_cond_embed_dim=NUM_MICRO_CONDS * cfg.micro_cond_dim, hidden_dropout=0.0, attention_dropout=0.0)
    return out


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[re.Pattern[str], str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, new in rules:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def uvit_state_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UVit2DModel weights in our names (the feed-forward's)."""
    return _rename(state, _FF_FROM)


def uvit_state_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(state, _FF_TO)


def load_uvit2d(folder: str | Path, dtype: torch.dtype | None = torch.float32,
                variant: str | None = None) -> UVit2DModel:
    """A diffusers `transformer/` folder (UVit2DModel) -> our network, frozen, checked against the
    files' tensor names and shapes before any weight is read."""
    folder = Path(folder)
    cfg = read_config_file(uvit_config_from_diffusers, folder / "config.json")
    files = find_weights(folder, "diffusion_pytorch_model", variant)
    net = build_checked(lambda: UVit2DModel(cfg), {"config": cfg}, uvit_state_from_diffusers(file_tensors(files)),
                        str(folder))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict(file))
    return fill(net, uvit_state_from_diffusers(state), dtype)


# ---------------------------------------------------------------------------- the whole folder


@dataclass
class AmusedParts:
    """What an aMUSEd folder holds, as t2i modules.

    transformer: the token model; vqvae: the image tokenizer (codes <-> images in [0, 1]);
    text_encoder: CLIP read at its penultimate layer (context) and projected text_embeds (pooled);
    mask_id: the mask token's id (>= the codebook size); schedule: the mask schedule's name.
    """

    transformer: UVit2DModel
    vqvae: VQAutoencoder
    text_encoder: CLIPTextEncoder
    mask_id: int
    schedule: str = "cosine"
    name: str = "amused"


def is_amused_folder(path: str | Path) -> bool:
    """A folder whose model_index.json names AmusedPipeline (reads that file only)."""
    path = Path(path)
    if not is_diffusers_folder(path):
        return False
    try:
        return read_json_object(path / "model_index.json", "a diffusers model index").get("_class_name") \
            == PIPELINE_CLASS
    except (ValueError, OSError):
        return False


def read_amused_scheduler(file: Path) -> tuple[int, str]:
    """(mask_token_id, masking_schedule) of an AmusedScheduler config."""
    raw = read_json_object(file, "a scheduler config")
    mask_id, schedule = raw.get("mask_token_id"), raw.get("masking_schedule", "cosine")
    if not isinstance(mask_id, int) or isinstance(mask_id, bool) or mask_id < 0:
        raise CheckpointError(f"{file}: mask_token_id must be a non-negative integer, got {mask_id!r}")
    if schedule not in MASK_SCHEDULES:
        raise CheckpointError(f"{file}: masking_schedule {schedule!r} is not one of {MASK_SCHEDULES}")
    return mask_id, schedule


def load_amused_parts(path: str | Path, dtype: torch.dtype = torch.float32) -> AmusedParts:
    """An AmusedPipeline folder -> AmusedParts (float32 unless dtype says otherwise; the tokenizer
    and the codebook are read as they are)."""
    root = Path(path)
    if not is_amused_folder(root):
        raise CheckpointError(f"{root}: not a diffusers {PIPELINE_CLASS} folder (model_index.json)")
    for part in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root / part} is missing: not a complete {PIPELINE_CLASS} folder")
    mask_id, schedule = read_amused_scheduler(root / "scheduler" / "scheduler_config.json")
    transformer = load_uvit2d(root / "transformer", dtype)
    cfg = transformer.cfg
    if not cfg.codebook_size <= mask_id < cfg.vocab_size:
        raise CheckpointError(f"{root}: mask_token_id {mask_id} must be a token the transformer embeds "
                              f"(< vocab_size {cfg.vocab_size}) and never predicts (>= codebook_size "
                              f"{cfg.codebook_size})")
    vqvae = load_diffusers_vq(root / "vqvae").to(dtype)
    if vqvae.cfg.num_codes != cfg.codebook_size:
        raise CheckpointError(f"{root}: the VQ model has {vqvae.cfg.num_codes} codes, the transformer predicts "
                              f"{cfg.codebook_size}")
    model = load_clip_text_folder(root / "text_encoder", dtype)
    if model.text_projection is None:
        raise CheckpointError(f"{root / 'text_encoder'}: aMUSEd needs a CLIPTextModelWithProjection")
    text = CLIPTextEncoder(CLIPTokenizer.from_folder(root / "tokenizer"), model, "penultimate", "text_embeds")
    if (text.context_dim, text.pooled_dim) != (cfg.text_dim, cfg.pooled_dim):
        raise CheckpointError(f"{root}: the text encoder gives widths ({text.context_dim}, {text.pooled_dim}), "
                              f"the transformer reads ({cfg.text_dim}, {cfg.pooled_dim})")
    return AmusedParts(transformer, vqvae, text.eval(), mask_id, schedule, root.name)


def vq_config_to_diffusers(cfg: VQAutoencoderConfig) -> dict[str, Any]:
    """The diffusers `VQModel` config.json dict describing the same tokenizer."""
    out = vae_config_to_diffusers(cfg.blocks())
    for key in ("shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv"):
        out.pop(key)
    out.update(_class_name="VQModel", num_vq_embeddings=cfg.num_codes, vq_embed_dim=cfg.code_dim,
               norm_type="group", lookup_from_codebook=True, force_upcast=True, scaling_factor=1.0)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}


def save_amused_folder(parts: AmusedParts, folder: str | Path) -> Path:
    """Write `parts` as an AmusedPipeline folder that diffusers and t2i read (built next to the
    target and renamed into place; an existing target is refused)."""
    folder = Path(folder)
    if folder.exists():
        raise ValueError(f"{folder} exists; choose a new folder")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fmt = {"format": "pt"}
    _write_json(tmp / "transformer" / "config.json", uvit_config_to_diffusers(parts.transformer.cfg))
    save_state_dict(uvit_state_to_diffusers(_weights(parts.transformer)),
                    tmp / "transformer" / "diffusion_pytorch_model.safetensors", fmt)
    vq = _weights(parts.vqvae)
    vq["quantize.embedding.weight"] = vq.pop("quantize.codebook")
    for ema in ("quantize.cluster_size", "quantize.embed_avg"):  # our EMA statistics: not diffusers'
        vq.pop(ema)
    _write_json(tmp / "vqvae" / "config.json", vq_config_to_diffusers(parts.vqvae.cfg))
    save_state_dict(vq, tmp / "vqvae" / "diffusion_pytorch_model.safetensors", fmt)
    text = parts.text_encoder
    config = clip_config_to_transformers(text.model.cfg)
    _write_json(tmp / "text_encoder" / "config.json", config)
    save_state_dict(clip_state_dict_to_transformers(_weights(text.model)), tmp / "text_encoder" / "model.safetensors",
                    fmt)
    text.tokenizer.save(tmp / "tokenizer")
    _write_json(tmp / "scheduler" / "scheduler_config.json",
                {"_class_name": "AmusedScheduler", "mask_token_id": parts.mask_id, "masking_schedule": parts.schedule})
    _write_json(tmp / "model_index.json", {
        "_class_name": PIPELINE_CLASS, "scheduler": ["diffusers", "AmusedScheduler"],
        "text_encoder": ["transformers", config["architectures"][0]], "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "UVit2DModel"], "vqvae": ["diffusers", "VQModel"]})
    tmp.rename(folder)
    return folder
