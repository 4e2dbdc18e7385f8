"""diffusers `config.json` <-> our network configs, for the U-Net and the KL autoencoder.

Our modules carry diffusers' parameter names, so loading a diffusers folder is a config
translation plus `load_state_dict(strict=True)`. This module is the only place that knows
diffusers' config vocabulary and its quirks:

- `attention_head_dim` in SD1/SD2/SDXL configs is really the number of heads (diffusers
  issue 2011); `num_attention_heads` is unset there. Head width is channels // heads.
- Many fields are "int or per-level list"; `transformer_layers_per_block` may be an int
  or a list (nested lists, the asymmetric layout, are not supported).
- `upcast_attention` only matters in fp16 and is ignored (we compute attention in the
  model's dtype with SDPA, and the parity target is fp32).
- Options we do not implement raise ValueError naming the option, rather than loading a
  network that silently computes something else.
"""

from __future__ import annotations

from typing import Any

from t2i.autoencoders.kl import AutoencoderKLConfig
from t2i.nets.unet import UNetConfig

# Defaults of diffusers' UNet2DConditionModel.__init__ for the fields we read (a config.json
# written by an older version may omit newer fields).
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "num_class_embeds": None,
}

# Options we do not implement, with the only value we accept.
_UNET_UNSUPPORTED: dict[str, Any] = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,  # None with num_class_embeds: one learned row per label (the x4 upscaler)
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}

_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_VAE_UNSUPPORTED: dict[str, Any] = {
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
}


def check_unsupported(cfg: dict[str, Any], allowed: dict[str, Any], what: str) -> None:
    for key, ok in allowed.items():
        if key in cfg and cfg[key] != ok:
            raise ValueError(f"{what}: unsupported option {key}={cfg[key]!r} (only {ok!r} is implemented)")


def per_level(value: Any, n: int, name: str) -> tuple:
    """An int/bool (same for every level) or a per-level list -> tuple of length n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} levels")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"{name}: nested per-block lists (asymmetric U-Nets) are not supported")
        return tuple(value)
    return (value,) * n


def _compact(values: tuple) -> Any:
    """A per-level tuple back to diffusers' style: a scalar if all equal, else a list."""
    return values[0] if len(set(values)) == 1 else list(values)


def sample_size_of(value: Any, default: int) -> int:
    if value is None:
        return default
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """UNetConfig from the dict of a diffusers `unet/config.json` (UNet2DConditionModel).

    Raises ValueError naming the option for anything we do not implement.
    """
    what = "UNet2DConditionModel config"
    check_unsupported(cfg, _UNET_UNSUPPORTED, what)

    def get(key: str) -> Any:
        return cfg.get(key, _UNET_DEFAULTS[key])

    down, up = list(get("down_block_types")), list(get("up_block_types"))
    channels = tuple(int(c) for c in get("block_out_channels"))
    n = len(channels)
    if len(down) != n or len(up) != n:
        raise ValueError(f"{what}: {len(down)} down / {len(up)} up block types for {n} levels")
    attention = []
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"{what}: unsupported option down_block_types containing {t!r}")
        attention.append(t == "CrossAttnDownBlock2D")
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != expected_up:
        raise ValueError(f"{what}: unsupported option up_block_types={up} (expected mirror {expected_up})")

    mid_type = get("mid_block_type")
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None):
        raise ValueError(f"{what}: unsupported option mid_block_type={mid_type!r}")

    # The naming quirk: without num_attention_heads, attention_head_dim holds the head count.
    heads = get("num_attention_heads")
    if heads is None:
        heads = get("attention_head_dim")
    if heads is None:
        raise ValueError(f"{what}: attention_head_dim/num_attention_heads must be set")

    context = get("cross_attention_dim")
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise ValueError(f"{what}: unsupported option cross_attention_dim={context} (per-level widths)")
        context = context[0]

    add_type = get("addition_embed_type")
    add_time_dim, add_in_dim = None, None
    if add_type == "text_time":
        add_time_dim = int(get("addition_time_embed_dim"))
        add_in_dim = int(get("projection_class_embeddings_input_dim"))
    elif add_type is not None:
        raise ValueError(f"{what}: unsupported option addition_embed_type={add_type!r}")

    return UNetConfig(
        in_channels=int(get("in_channels")),
        out_channels=int(get("out_channels")),
        block_channels=channels,
        layers_per_block=tuple(int(v) for v in per_level(get("layers_per_block"), n, "layers_per_block")),
        attention=tuple(attention),
        num_heads=tuple(int(v) for v in per_level(heads, n, "attention_head_dim")),
        transformer_depth=tuple(
            int(v) for v in per_level(get("transformer_layers_per_block"), n, "transformer_layers_per_block")
        ),
        context_dim=int(context),
        linear_projection=bool(get("use_linear_projection")),
        only_cross_attention=tuple(
            bool(v) for v in per_level(get("only_cross_attention"), n, "only_cross_attention")
        ),
        mid_block=mid_type is not None,
        mid_attention=mid_type == "UNetMidBlock2DCrossAttn",
        norm_groups=int(get("norm_num_groups")),
        norm_eps=float(get("norm_eps")),
        flip_sin_to_cos=bool(get("flip_sin_to_cos")),
        freq_shift=float(get("freq_shift")),
        time_embed_dim=get("time_embedding_dim"),
        time_cond_proj_dim=None if get("time_cond_proj_dim") is None else int(get("time_cond_proj_dim")),
        addition_time_embed_dim=add_time_dim,
        projection_class_embeddings_input_dim=add_in_dim,
        dropout=float(get("dropout")),
        sample_size=sample_size_of(get("sample_size"), 64),
        num_class_embeds=None if get("num_class_embeds") is None else int(get("num_class_embeds")),
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """The diffusers `unet/config.json` dict describing the same network."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)]
    mid = None
    if cfg.mid_block:
        mid = "UNetMidBlock2DCrossAttn" if cfg.mid_attention else "UNetMidBlock2D"
    shift = cfg.freq_shift
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": int(shift) if float(shift).is_integer() else shift,
        "down_block_types": down,
        "mid_block_type": mid,
        "up_block_types": up,
        "only_cross_attention": _compact(cfg.only_cross_attention),
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": _compact(cfg.layers_per_block),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": _compact(cfg.transformer_depth),
        # The quirk again: diffusers reads the head count from attention_head_dim.
        "attention_head_dim": _compact(cfg.num_heads),
        "num_attention_heads": None,
        "use_linear_projection": cfg.linear_projection,
        "upcast_attention": False,
        "time_embedding_dim": cfg.time_embed_dim,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
        "addition_embed_type": "text_time" if cfg.addition_time_embed_dim is not None else None,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
    }
    if cfg.num_class_embeds is not None:  # written only when set: other configs stay as they were
        out["num_class_embeds"] = cfg.num_class_embeds
    return out


def vae_config_from_diffusers(cfg: dict[str, Any]) -> AutoencoderKLConfig:
    """AutoencoderKLConfig from the dict of a diffusers `vae/config.json` (AutoencoderKL).

    `force_upcast` (an fp16 hint) is ignored. Raises ValueError naming unsupported options.
    """
    what = "AutoencoderKL config"
    check_unsupported(cfg, _VAE_UNSUPPORTED, what)

    def get(key: str) -> Any:
        return cfg.get(key, _VAE_DEFAULTS[key])

    channels = tuple(int(c) for c in get("block_out_channels"))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(get(key))
        if types != [kind] * len(channels):
            raise ValueError(f"{what}: unsupported option {key}={types} (expected {len(channels)} x {kind})")
    layers = get("layers_per_block")
    if not isinstance(layers, int):
        raise ValueError(f"{what}: unsupported option layers_per_block={layers!r} (an int is expected)")
    shift = get("shift_factor")
    return AutoencoderKLConfig(
        in_channels=int(get("in_channels")),
        out_channels=int(get("out_channels")),
        block_channels=channels,
        layers_per_block=layers,
        latent_channels=int(get("latent_channels")),
        norm_groups=int(get("norm_num_groups")),
        mid_attention=bool(get("mid_block_add_attention")),
        scaling_factor=float(get("scaling_factor")),
        shift_factor=None if shift is None else float(shift),
        use_quant_conv=bool(get("use_quant_conv")),
        use_post_quant_conv=bool(get("use_post_quant_conv")),
        sample_size=sample_size_of(get("sample_size"), 512),
    )


def vae_config_to_diffusers(cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """The diffusers `vae/config.json` dict describing the same autoencoder."""
    n = len(cfg.block_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }
