"""diffusers' unCLIP layouts read as t2i configs and state dicts: `PriorTransformer`, `UnCLIPTextProjModel`,
and the Karlo decoder / super-resolution U-Nets (`UNet2DConditionModel` / `UNet2DModel` with ResNet
up/down-sampling, scale-shift time conditioning and added-KV attention).

    model_index.json   {"_class_name": "UnCLIPPipeline" or "UnCLIPImageVariationPipeline", ...}
    prior/             config.json (PriorTransformer) + weights (text-to-image folders)
    image_encoder/, feature_extractor/  CLIPVisionModelWithProjection + CLIPImageProcessor (variation folders)
    text_proj/         config.json (UnCLIPTextProjModel) + weights
    decoder/           UNet2DConditionModel (class_embed_type "identity", SimpleCrossAttn blocks)
    super_res_first/, super_res_last/   UNet2DModel (ResnetDownsampleBlock2D / ResnetUpsampleBlock2D)
    text_encoder/, tokenizer/           CLIPTextModelWithProjection + CLIP BPE
    prior_scheduler/, decoder_scheduler/, super_res_scheduler/   UnCLIPScheduler

Only configs are translated and keys renamed here (refusing by name what t2i does not implement); the
family (`t2i.systems.unclip`) builds and fills the networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2i.checkpoints.diffusers_dit import names_pipeline
from t2i.checkpoints.diffusers_nets import check_unsupported
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.prior_transformer import EXTRA_TOKENS, PriorConfig
from t2i.nets.unclip_unet import TextProjConfig, UnCLIPUNetConfig

# text-to-image (prior + decoder), and image variations (CLIP image tower + decoder, no prior)
PIPELINES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")

# PriorTransformer options t2i does not implement, with the only value accepted.
_PRIOR_UNSUPPORTED: dict[str, Any] = {
    "additional_embeddings": EXTRA_TOKENS,
    "time_embed_act_fn": "silu",
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}


def is_diffusers_unclip(path: Path) -> bool:
    """A folder whose model_index.json names an UnCLIPPipeline or UnCLIPImageVariationPipeline (reads that
    file only)."""
    return any(names_pipeline(path, name) for name in PIPELINES)


def prior_config_from_diffusers(cfg: dict[str, Any]) -> PriorConfig:
    """PriorConfig from a diffusers `prior/config.json`; ValueError names what t2i does not implement."""
    unsupported = dict(_PRIOR_UNSUPPORTED)
    width = cfg.get("num_attention_heads", 32) * cfg.get("attention_head_dim", 64)
    for key in ("time_embed_dim",):  # the default (None) and the width it resolves to are the same network
        if cfg.get(key) == width:
            unsupported.pop(key)
    check_unsupported(cfg, unsupported, "PriorTransformer config")
    norms = {}
    for key, field in (("norm_in_type", "norm_in"), ("embedding_proj_norm_type", "text_embed_norm")):
        if cfg.get(key) not in (None, "layer"):
            raise ValueError(f"PriorTransformer config: {key}={cfg[key]!r} is not supported (None or 'layer')")
        norms[field] = cfg.get(key) == "layer"
    return PriorConfig(heads=cfg.get("num_attention_heads", 32), head_dim=cfg.get("attention_head_dim", 64),
                       layers=cfg.get("num_layers", 20), embed_dim=cfg.get("embedding_dim", 768),
                       text_tokens=cfg.get("num_embeddings", 77), **norms)


# diffusers' BasicTransformerBlock (no cross-attention) -> t2i's PreNormBlock
_PRIOR_BLOCK = (("attn1.", "attn."), ("norm3.", "norm2."), ("ff.net.0.proj.", "mlp.fc1."), ("ff.net.2.", "mlp.fc2."))


def prior_state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PriorTransformer weights -> t2i `PriorTransformer` keys (the blocks renamed, the rest as is)."""
    out = {}
    for key, value in state.items():
        if key.startswith("transformer_blocks."):
            key = "blocks." + key[len("transformer_blocks."):]
            for old, new in _PRIOR_BLOCK:
                key = key.replace("." + old, "." + new)
        out[key] = value
    return out


def text_proj_config_from_diffusers(cfg: dict[str, Any]) -> TextProjConfig:
    """TextProjConfig from a diffusers `text_proj/config.json` (UnCLIPTextProjModel)."""
    return TextProjConfig(extra_tokens=cfg.get("clip_extra_context_tokens", 4),
                          embed_dim=cfg.get("clip_embeddings_dim", 768), time_embed_dim=cfg["time_embed_dim"],
                          context_dim=cfg["cross_attention_dim"])


# UNet2DConditionModel / UNet2DModel options the Karlo U-Nets do not use, with the only value accepted.
_UNET_UNSUPPORTED: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "addition_embed_type": None,
    "class_embeddings_concat": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "upcast_attention": False,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attn_norm_num_groups": None,
    "num_attention_heads": None,
}
_DOWN = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}
_MID = {"UNetMidBlock2DSimpleCrossAttn": "cross", "UNetMidBlock2D": "self"}


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UnCLIPUNetConfig:
    """UnCLIPUNetConfig from a Karlo `decoder/` (UNet2DConditionModel) or `super_res_*/` (UNet2DModel) config;
    ValueError names what t2i does not implement."""
    what = f"{cfg.get('_class_name', 'U-Net')} config"
    check_unsupported(cfg, _UNET_UNSUPPORTED, what)
    conditional = cfg.get("_class_name", "UNet2DConditionModel" if "cross_attention_dim" in cfg else "UNet2DModel") \
        == "UNet2DConditionModel"
    channels = tuple(cfg["block_out_channels"])
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    if any(b not in _DOWN for b in down) or any(b not in _UP for b in up):
        raise ValueError(f"{what}: block types {down} / {up} are not the Karlo U-Net's "
                         f"({', '.join(_DOWN)} / {', '.join(_UP)})")
    attention = tuple(_DOWN[b] for b in down)
    if tuple(_UP[b] for b in reversed(up)) != attention:
        raise ValueError(f"{what}: the up blocks {up} do not mirror the down blocks {down}")
    default_mid = "UNetMidBlock2DSimpleCrossAttn" if conditional else "UNetMidBlock2D"
    mid = cfg.get("mid_block_type", default_mid)
    if mid not in _MID or (_MID[mid] == "cross") != conditional:
        raise ValueError(f"{what}: mid_block_type {mid!r} is not supported here")
    class_embed = cfg.get("class_embed_type")
    if class_embed not in (None, "identity") or (class_embed == "identity") != conditional:
        raise ValueError(f"{what}: class_embed_type {class_embed!r} is not supported (Karlo's decoder: 'identity')")
    if cfg.get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
        raise ValueError(f"{what}: resnet_time_scale_shift {cfg['resnet_time_scale_shift']!r} is not supported")
    layers = cfg.get("layers_per_block", 2)
    head_dim = cfg.get("attention_head_dim", 8)
    if isinstance(head_dim, (list, tuple)):
        if len(set(head_dim)) != 1:
            raise ValueError(f"{what}: per-level attention_head_dim {head_dim} is not supported")
        head_dim = head_dim[0]
    return UnCLIPUNetConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), block_channels=channels,
        layers_per_block=layers if isinstance(layers, int) else layers[0], attention=attention,
        head_dim=head_dim or channels[-1],
        context_dim=cfg.get("cross_attention_dim") if conditional else None,
        mid_attention=conditional or cfg.get("add_attention", True),
        scale_shift=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        class_embedding=conditional, norm_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
        sample_size=cfg.get("sample_size", 64))


def unet_state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Karlo U-Nets carry diffusers' names; the unused `attentions.j.to_out.1` dropout has no weight."""
    return dict(state)


@dataclass
class UnCLIPSchedulerConfig:
    """diffusers' UnCLIPScheduler settings: the cosine schedule ("squaredcos_cap_v2", the only one it has), what
    the network predicts ("epsilon" or "sample": x0, the prior; t2i's files also "v_prediction"), x0 clipping, and
    the posterior variance
    ("fixed_small_log": beta-tilde; "learned_range": the network's interpolation values, IDDPM eq. 15)."""

    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.variance_type not in ("fixed_small_log", "learned_range"):
            raise ValueError(f"UnCLIPScheduler variance_type {self.variance_type!r} is not supported")
        # "v_prediction" is t2i's own (its shapes decoders); diffusers' UnCLIPScheduler has epsilon and sample
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"UnCLIPScheduler prediction_type {self.prediction_type!r} is not supported")
        if not 1 <= self.num_train_timesteps <= 100_000:
            raise ValueError(f"UnCLIPScheduler num_train_timesteps {self.num_train_timesteps} is out of range")

    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32, IDDPM's cosine schedule with betas capped at 0.999."""
        return ScheduleConfig(num_train_timesteps=self.num_train_timesteps,
                              beta_schedule="squaredcos_cap_v2").alphas_cumprod()

    def final_scale(self) -> float:
        """What UnCLIPScheduler's last step (t = 0) multiplies x0 by: beta_0 / (1 - alphas_cumprod_0), 1 in exact
        arithmetic but 1 - 5e-4 in float32 for the cosine schedule (beta_0 ~ 4e-5 is read back from
        1 - (1 - beta_0)). Karlo's prior embeddings and images carry that factor, so t2i applies it too."""
        cfg = ScheduleConfig(num_train_timesteps=self.num_train_timesteps, beta_schedule="squaredcos_cap_v2")
        return float(cfg.betas()[0] / (1 - cfg.alphas_cumprod()[0]))


def scheduler_config_from_diffusers(cfg: dict[str, Any]) -> UnCLIPSchedulerConfig:
    """UnCLIPSchedulerConfig from a diffusers `*_scheduler/scheduler_config.json`."""
    if cfg.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
        raise ValueError(f"an unCLIP stage needs UnCLIPScheduler, got {cfg['_class_name']}")
    if cfg.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
        raise ValueError(f"UnCLIPScheduler beta_schedule {cfg['beta_schedule']!r} is not supported")
    return UnCLIPSchedulerConfig(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                 variance_type=cfg.get("variance_type", "fixed_small_log"),
                                 clip_sample=cfg.get("clip_sample", True),
                                 clip_sample_range=cfg.get("clip_sample_range", 1.0),
                                 prediction_type=cfg.get("prediction_type", "epsilon"))
