"""diffusers' DeepFloyd IF folder layouts, read as configs.

    model_index.json   {"_class_name": "IFPipeline" | "IFSuperResolutionPipeline", ...}
    unet/              config.json (UNet2DConditionModel with IF's blocks) + diffusion_pytorch_model.safetensors
    scheduler/         scheduler_config.json (DDPMScheduler, variance_type "learned_range", thresholding)
    image_noising_scheduler/   (stage II only) the schedule the low-res image is noised with
    text_encoder/, tokenizer/  T5 (T5EncoderModel; stage II folders may leave them out: null)

`t2i.nets.if_unet.IFUNet` carries the U-Net's parameter names, so the weights need no key map: this
module translates the config (refusing by name what t2i does not implement) and reads the schedules.
The family (`t2i.systems.deepfloyd_if`) builds and fills the network. Safety checker, watermarker and
feature extractor folders are not read (t2i draws no watermark and runs no safety model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2i.checkpoints.diffusers_ddpm import mirrored_attention, read_ddpm_schedule
from t2i.checkpoints.diffusers_folder import read_config_file
from t2i.checkpoints.diffusers_nets import check_unsupported, per_level, sample_size_of
from t2i.checkpoints.diffusers_scheduler import read_scheduler_config
from t2i.checkpoints.io import CheckpointError, read_json_object
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.if_unet import IFUNetConfig

BASE, SUPER_RESOLUTION = "IFPipeline", "IFSuperResolutionPipeline"

# UNet2DConditionModel options t2i does not implement for IF, with the only value accepted.
_UNSUPPORTED: dict[str, Any] = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
    "use_linear_projection": False,
    "num_attention_heads": None,
    "transformer_layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
}
_DOWN = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}


def if_pipeline_class(path: Path) -> str | None:
    """"IFPipeline" / "IFSuperResolutionPipeline" for a folder whose model_index.json names one, else None
    (reads that file only)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = read_json_object(index, "a diffusers model index").get("_class_name")
    except (ValueError, OSError):
        return None
    return name if name in (BASE, SUPER_RESOLUTION) else None


def if_unet_config_from_diffusers(cfg: dict[str, Any]) -> IFUNetConfig:
    """IFUNetConfig from a diffusers `unet/config.json` written for IF; ValueError names what t2i does
    not implement."""
    what = "IF UNet2DConditionModel config"
    check_unsupported(cfg, _UNSUPPORTED, what)
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    n = len(channels)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attention = mirrored_attention(down, up, n, _DOWN, _UP, what)
    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise ValueError(f"{what}: unsupported option cross_attention_dim={context} (per-level widths)")
        context = context[0]
    hid_type = cfg.get("encoder_hid_dim_type")
    if cfg.get("encoder_hid_dim") is not None and hid_type not in (None, "text_proj"):
        raise ValueError(f"{what}: unsupported option encoder_hid_dim_type={hid_type!r}")
    add_type = cfg.get("addition_embed_type")
    if add_type not in (None, "text"):
        raise ValueError(f"{what}: unsupported option addition_embed_type={add_type!r}")
    class_type = cfg.get("class_embed_type")
    if class_type not in (None, "timestep"):
        raise ValueError(f"{what}: unsupported option class_embed_type={class_type!r}")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"{what}: unsupported option resnet_time_scale_shift={shift!r}")
    only_cross = per_level(cfg.get("only_cross_attention", False), n, "only_cross_attention")
    mid_only = cfg.get("mid_block_only_cross_attention")
    if mid_only is None:  # diffusers: the single only_cross_attention value, or False for a per-level list
        mid_only = cfg.get("only_cross_attention", False) if not isinstance(cfg.get("only_cross_attention"),
                                                                            (list, tuple)) else False
    heads = per_level(cfg.get("attention_head_dim", 8), n, "attention_head_dim")  # a head width here
    return IFUNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        block_channels=channels,
        layers_per_block=tuple(int(v) for v in per_level(cfg.get("layers_per_block", 2), n, "layers_per_block")),
        attention=attention, head_dim=tuple(int(h if h is not None else c) for h, c in zip(heads, channels,
                                                                                            strict=True)),
        only_cross_attention=tuple(bool(v) for v in only_cross), mid_only_cross_attention=bool(mid_only),
        context_dim=int(context), encoder_hid_dim=cfg.get("encoder_hid_dim"),
        text_embed_heads=int(cfg.get("addition_embed_type_num_heads", 64)) if add_type == "text" else None,
        class_embed=class_type == "timestep", concat_class_embed=bool(cfg.get("class_embeddings_concat", False)),
        act=str(cfg.get("act_fn", "silu")), scale_shift=shift == "scale_shift",
        skip_time_act=bool(cfg.get("resnet_skip_time_act", False)),
        resnet_out_scale=float(cfg.get("resnet_out_scale_factor", 1.0)),
        mid_scale=float(cfg.get("mid_block_scale_factor", 1.0)), time_embed_dim=cfg.get("time_embedding_dim"),
        time_embed_act=cfg.get("time_embedding_act_fn"), cross_attention_norm=cfg.get("cross_attention_norm"),
        norm_groups=int(cfg.get("norm_num_groups", 32)), norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
        dropout=float(cfg.get("dropout", 0.0)), sample_size=sample_size_of(cfg.get("sample_size"), 64))


def if_unet_config_to_diffusers(cfg: IFUNetConfig) -> dict[str, Any]:
    """The diffusers `unet/config.json` dict describing the same network (ValueError for t2i's Efficient U-Net
    options, which diffusers has no layout for)."""
    if cfg.efficient or cfg.skip_scale != 1.0:
        raise ValueError("an Efficient U-Net (efficient, skip_scale) has no diffusers UNet2DConditionModel layout")
    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in cfg.attention]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(cfg.attention)]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": cfg.sample_size, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "down_block_types": down, "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "block_out_channels": list(cfg.block_channels),
        "layers_per_block": list(cfg.layers_per_block), "attention_head_dim": list(cfg.head_dim),
        "only_cross_attention": list(cfg.only_cross_attention),
        "mid_block_only_cross_attention": cfg.mid_only_cross_attention, "cross_attention_dim": cfg.context_dim,
        "encoder_hid_dim": cfg.encoder_hid_dim, "encoder_hid_dim_type": "text_proj" if cfg.encoder_hid_dim else None,
        "addition_embed_type": "text" if cfg.text_embed_heads else None,
        "addition_embed_type_num_heads": cfg.text_embed_heads or 64,
        "class_embed_type": "timestep" if cfg.class_embed else None,
        "class_embeddings_concat": cfg.concat_class_embed, "act_fn": cfg.act,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift else "default",
        "resnet_skip_time_act": cfg.skip_time_act, "resnet_out_scale_factor": cfg.resnet_out_scale,
        "mid_block_scale_factor": cfg.mid_scale, "time_embedding_dim": cfg.time_embed_dim,
        "time_embedding_act_fn": cfg.time_embed_act, "cross_attention_norm": cfg.cross_attention_norm,
        "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps, "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": int(cfg.freq_shift) if float(cfg.freq_shift).is_integer() else cfg.freq_shift,
        "dropout": cfg.dropout,
    }


def read_if_schedules(root: Path, learned: bool) -> tuple[ScheduleConfig, ScheduleConfig | None]:
    """(the sampling schedule, the stage II image-noising schedule or None) of an IF folder. The
    sampling schedule's variance_type must say "learned_range" exactly when the network outputs its
    variance (`read_ddpm_schedule`)."""
    schedule = read_ddpm_schedule(root / "scheduler" / "scheduler_config.json", learned=learned)
    noising = None
    if (root / "image_noising_scheduler").is_dir():
        noising = read_scheduler_config(root / "image_noising_scheduler")
    return schedule, noising


def read_if_unet_config(root: Path) -> IFUNetConfig:
    """The folder's `unet/config.json` as an IFUNetConfig (CheckpointError naming the file otherwise)."""
    if if_pipeline_class(root) is None:
        raise CheckpointError(f"{root}: not a diffusers IF folder (model_index.json naming {BASE} or "
                              f"{SUPER_RESOLUTION})")
    return read_config_file(if_unet_config_from_diffusers, root / "unet" / "config.json")
