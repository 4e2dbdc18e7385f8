"""diffusers' DDPM folder layout (`DDPMPipeline` / `DDIMPipeline` with a `UNet2DModel`), read as configs.

    model_index.json   {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/              config.json (UNet2DModel) + diffusion_pytorch_model.safetensors
    scheduler/         scheduler_config.json (DDPMScheduler or DDIMScheduler)

`t2i.nets.pixel_unet.PixelUNet` carries UNet2DModel's parameter names, so the weights need no key
map: this module translates the config (refusing the options t2i does not implement, by name)
and names the weight files. The family (`t2i.systems.ddpm`) builds and fills the network.

A learned-variance model (IDDPM) is a UNet2DModel with out_channels = 2 * in_channels under a
DDPMScheduler with `variance_type="learned_range"`; the two go together (diffusers splits the output
only for a learned variance type, and a learned type without the variance half fails), so a folder
pairing one without the other is refused. The variance is then the network's: the schedule read
here leaves variance_type unset, and the family samples with the learned one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from t2i.checkpoints.diffusers_folder import read_config_file
from t2i.checkpoints.diffusers_nets import check_unsupported, sample_size_of
from t2i.checkpoints.diffusers_scheduler import scheduler_config_from_dict
from t2i.checkpoints.io import CheckpointError, find_weights, read_json_object
from t2i.checkpoints.limits import check_schedule
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.pixel_unet import PixelUNetConfig

PIPELINES = ("DDPMPipeline", "DDIMPipeline")

# UNet2DModel options t2i does not implement, with the only value accepted.
_UNSUPPORTED: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def mirrored_attention(down: Sequence[str], up: Sequence[str], levels: int, down_kinds: dict[str, bool],
                       up_kinds: dict[str, bool], what: str) -> tuple[bool, ...]:
    """Which levels attend, from diffusers' block type names (`*_kinds`: name -> attends), checking that
    there is one block a level each way, every type is known, and the up blocks mirror the down ones
    (ValueError naming the config `what` otherwise)."""
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"{what}: {len(down)} down and {len(up)} up blocks for {levels} levels")
    for kind in (*down, *up):
        if kind not in down_kinds and kind not in up_kinds:
            raise ValueError(f"{what}: unsupported block type {kind!r} "
                             f"(supported: {sorted({**down_kinds, **up_kinds})})")
    attention = tuple(down_kinds.get(k, False) for k in down)
    if attention != tuple(up_kinds.get(k, False) for k in reversed(up)):
        raise ValueError(f"{what}: the up blocks {list(up)} do not mirror the down blocks {list(down)}")
    return attention


def is_diffusers_ddpm(path: Path) -> bool:
    """A folder whose model_index.json names a DDPM or DDIM pipeline (reads that file only)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return read_json_object(index, "a diffusers model index").get("_class_name") in PIPELINES
    except (ValueError, OSError):
        return False


def pixel_unet_config_from_diffusers(cfg: dict[str, Any]) -> PixelUNetConfig:
    """PixelUNetConfig from a diffusers `unet/config.json` (UNet2DModel); ValueError names what
    t2i does not implement."""
    what = "UNet2DModel config"
    check_unsupported(cfg, _UNSUPPORTED, what)
    channels = tuple(cfg.get("block_out_channels", (224, 448, 672, 896)))
    n = len(channels)
    down = cfg.get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3)
    up = cfg.get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",))
    attention = mirrored_attention(down, up, n, _DOWN, _UP, what)
    groups = cfg.get("norm_num_groups", 32)
    if cfg.get("attn_norm_num_groups") not in (None, groups):
        raise ValueError(f"{what}: attn_norm_num_groups other than norm_num_groups is not supported")
    head_dim = cfg.get("attention_head_dim", 8)
    layers = cfg.get("layers_per_block", 2)
    return PixelUNetConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), block_channels=channels,
        layers_per_block=(layers,) * n, attention=attention,
        # diffusers: heads = channels // attention_head_dim (None: one head of full width)
        num_heads=tuple(1 if head_dim is None else c // head_dim for c in channels),
        transformer_depth=(1,) * n, context_dim=None, mid_attention=bool(cfg.get("add_attention", True)),
        norm_groups=groups, norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
        dropout=float(cfg.get("dropout", 0.0)), sample_size=sample_size_of(cfg.get("sample_size"), 32))


def read_diffusers_ddpm(path: str | Path) -> tuple[PixelUNetConfig, ScheduleConfig, list[Path]]:
    """A diffusers DDPM/DDIM folder -> (network config, schedule, the U-Net's weight files)."""
    root = Path(path)
    if not is_diffusers_ddpm(root):
        raise CheckpointError(f"{root}: not a diffusers DDPM folder (model_index.json naming one of {PIPELINES})")
    cfg = read_config_file(pixel_unet_config_from_diffusers, root / "unet" / "config.json")
    schedule = read_ddpm_schedule(root / "scheduler" / "scheduler_config.json",
                                  learned=cfg.out_channels == 2 * cfg.in_channels)
    return cfg, schedule, find_weights(root / "unet", "diffusion_pytorch_model")


LEARNED_VARIANCE = "learned_range"  # IDDPM eq. 15, the one learned variance type t2i samples


def read_ddpm_schedule(file: Path, learned: bool) -> ScheduleConfig:
    """The folder's scheduler config; for a learned-variance network (learned) it must say
    variance_type "learned_range", which is then left out of the ScheduleConfig (see the module
    docstring), and for any other network it must not."""
    def read(raw: dict[str, Any], source: str) -> ScheduleConfig:
        said = raw.get("variance_type") == LEARNED_VARIANCE
        if said != learned:
            raise CheckpointError(
                f"{source}: variance_type {raw.get('variance_type')!r} with a U-Net of "
                f"{'2x' if learned else '1x'} its input channels (learned_range needs 2x, and only it)")
        return scheduler_config_from_dict({k: v for k, v in raw.items() if not (said and k == "variance_type")},
                                          source)

    schedule = read_config_file(read, file, source=str(file))
    check_schedule(schedule, str(file))
    return schedule
