"""The configs of a single-file SD checkpoint: which layout it is and the shapes of its networks.

A file's weights do not say everything. Configs are resolved in this order: a diffusers folder
given as `config` (as diffusers' `from_single_file(config=...)`), else the `t2i_sd_config` metadata
our exporter writes, else inference from the keys and shapes plus the released-model constants
that weights cannot show (head counts: 8 per level for SD1, 64-wide heads otherwise; GroupNorm 32;
VAE scaling 0.18215, SDXL 0.13025; CLIP heads 64 wide).

Prediction type (eps vs v cannot be told from weights): the `prediction` argument, else our
metadata, else a `v_pred` key in the file (ComfyUI's marker), else a sidecar `FILE.yaml` with
`parameterization: "v"` (AUTOMATIC1111's convention), else the layout default diffusers uses:
v-prediction for SD 2.x (the 768-v models, e.g. SD 2.1), epsilon for SD 2.x inpainting, SD 1.x
and SDXL. SD 2.x *base* (512 px) checkpoints are epsilon: pass `prediction="epsilon"`.
A `ztsnr` key (ComfyUI) turns on the zero-terminal-SNR rescale.

Inference reads only keys and shapes, so it runs on the meta tensors of a safetensors header too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.kl import AutoencoderKLConfig
from t2i.checkpoints.diffusers_folder import read_config_file, read_schedule
from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
from t2i.checkpoints.io import CheckpointError, check_safetensors_header, json_object, parse_json, read_json_object
from t2i.checkpoints.parts import LAYOUTS
from t2i.checkpoints.sd_keys import TEXT_SLOTS, UNET_PREFIX, VAE_PREFIX, TextSlot, indices, split_prefix, text_state
from t2i.checkpoints.transformers_text import clip_config_from_transformers
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.unet import UNetConfig
from t2i.text.clip import CLIPTextConfig
from t2i.text.clip_tokenizer import read_pad_token

METADATA_KEY = "t2i_sd_config"
PREDICTIONS = ("epsilon", "v_prediction")


def detect_layout(state: dict[str, Any]) -> str:
    """One of LAYOUTS ("sd1", "sd2", "sdxl", "sdxl_refiner"), from which text-encoder prefixes the keys carry."""
    keys = list(state)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET_PREFIX):
        raise CheckpointError(f"no U-Net keys ({UNET_PREFIX}*): not a Stable Diffusion single-file checkpoint")
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise CheckpointError("no text encoder keys (cond_stage_model.* / conditioner.embedders.*): cannot tell "
                          "SD 1.x, 2.x and XL apart; a U-Net-only file needs a diffusers folder as config")


def infer_unet_config(unet: dict[str, torch.Tensor], layout: str, prediction: str) -> UNetConfig:
    """UNetConfig from original-layout U-Net keys (prefix removed) and shapes. Head counts and
    GroupNorm groups do not show in weights: they follow the released models (see module doc)."""
    keys = list(unet)
    levels = [{"c": 0, "n": 0, "attn": False, "depth": 1}]  # one per level, from the top down
    for k in indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{k}.0.op.weight" in unet:  # a downsampler closes the level
            levels.append({"c": 0, "n": 0, "attn": False, "depth": 1})
            continue
        level = levels[-1]
        level["c"] = unet[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0]
        level["n"] += 1
        blocks = indices(keys, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")
        if blocks:
            level["attn"], level["depth"] = True, len(blocks)
    channels = [lv["c"] for lv in levels]
    mid_depth = len(indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if not levels[-1]["attn"] and mid_depth:  # the mid block takes the last level's depth
        levels[-1]["depth"] = mid_depth
    to_k = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in unet.items() if k.endswith(".1.proj_in.weight"))
    heads = [8] * len(channels) if layout == "sd1" else [max(c // 64, 1) for c in channels]
    label = unet.get("label_emb.0.0.weight")
    temb = unet["time_embed.0.weight"].shape[0]
    size = {"sd1": 64, "sd2": 96 if prediction == "v_prediction" else 64}.get(layout, 128)
    return UNetConfig(
        in_channels=unet["input_blocks.0.0.weight"].shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        block_channels=tuple(channels),
        layers_per_block=tuple(lv["n"] for lv in levels),
        attention=tuple(lv["attn"] for lv in levels),
        num_heads=tuple(heads),
        transformer_depth=tuple(lv["depth"] for lv in levels),
        context_dim=to_k.shape[1],
        linear_projection=proj_in.ndim == 2,
        only_cross_attention=(False,) * len(channels),
        mid_block=any(k.startswith("middle_block.") for k in keys),
        mid_attention="middle_block.1.proj_in.weight" in unet,
        time_embed_dim=None if temb == 4 * channels[0] else temb,  # None: the usual 4 x width
        # SDXL: time ids are embedded 256 wide each (pooled text + 6 or 5 ids go into label_emb)
        addition_time_embed_dim=None if label is None else 256,
        projection_class_embeddings_input_dim=None if label is None else label.shape[1],
        sample_size=size,
    )


def infer_vae_config(vae: dict[str, torch.Tensor], layout: str, sample_size: int) -> AutoencoderKLConfig:
    """AutoencoderKLConfig from original-layout keys (prefix removed) and shapes."""
    keys = list(vae)
    levels = indices(keys, r"encoder\.down\.(\d+)\.")
    channels = tuple(vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels)
    return AutoencoderKLConfig(
        in_channels=vae["encoder.conv_in.weight"].shape[1],
        out_channels=vae["decoder.conv_out.weight"].shape[0],
        block_channels=channels,
        layers_per_block=len(indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=vae["decoder.conv_in.weight"].shape[1],
        mid_attention="encoder.mid.attn_1.q.weight" in vae,
        scaling_factor=0.13025 if layout.startswith("sdxl") else 0.18215,
        use_quant_conv="quant_conv.weight" in vae,
        use_post_quant_conv="post_quant_conv.weight" in vae,
        sample_size=sample_size,
    )


def infer_clip_config(ours: dict[str, torch.Tensor], slot: TextSlot) -> CLIPTextConfig:
    """CLIPTextConfig from our-keyed weights (after any layer cut): shapes give the sizes; heads
    are 64 wide in every released tower; OpenCLIP towers use GELU, OpenAI's quick-GELU."""
    vocab, width = ours["token_embedding.weight"].shape
    proj = ours.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab, width=width, layers=len(indices(list(ours), r"layers\.(\d+)\.")),
        heads=max(width // 64, 1), mlp_dim=ours["layers.0.mlp.fc1.weight"].shape[0],
        max_positions=ours["position_embedding.weight"].shape[0],
        activation="gelu" if slot.layout == "openclip" else "quick_gelu",
        projection_dim=None if proj is None else proj.shape[0],
        eos_token_id=2, pooling="argmax",  # as the released text_encoder configs say
    )


def default_schedule(prediction: str, zero_snr: bool = False) -> ScheduleConfig:
    """The training schedule of every released SD 1/2/XL model (scaled-linear betas 0.00085-0.012)."""
    return ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction, rescale_betas_zero_snr=zero_snr, timestep_spacing="leading",
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@dataclass
class SingleFileConfig:
    """Everything a single file does not say in its weights: the resolved configs of its parts.

    Stored as JSON in the safetensors metadata under `t2i_sd_config` by our exporter.
    """

    family: str  # the layout, one of LAYOUTS
    unet: UNetConfig
    vae: AutoencoderKLConfig
    text: list[CLIPTextConfig]
    pad_tokens: list[str]
    schedule: ScheduleConfig
    defaults: dict[str, Any] = field(default_factory=dict)  # generation settings, as the file stores them
    zero_empty_negative: bool = False
    scheduler_class: str | None = None  # the diffusers scheduler class named where the config came from

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        # JSON has no infinity; a dropped field takes its (infinite) default again on reading.
        d["schedule"] = {k: v for k, v in d["schedule"].items() if not (isinstance(v, float) and math.isinf(v))}
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str, where: str = METADATA_KEY) -> SingleFileConfig:
        """Parse the metadata; anything malformed is one CheckpointError naming `where`."""
        d = json_object(parse_json(raw, where), where)
        if d.get("family") not in LAYOUTS:
            raise CheckpointError(f"{where}: names an unknown family {d.get('family')!r}")
        try:
            return cls(family=d["family"], unet=UNetConfig(**d["unet"]), vae=AutoencoderKLConfig(**d["vae"]),
                       text=[CLIPTextConfig(**t) for t in d["text"]], pad_tokens=[str(p) for p in d["pad_tokens"]],
                       schedule=ScheduleConfig(**d["schedule"]), defaults=dict(d.get("defaults") or {}),
                       zero_empty_negative=bool(d.get("zero_empty_negative", False)),
                       scheduler_class=d.get("scheduler_class"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed config ({type(e).__name__}: {e})") from None


def _sidecar_prediction(path: Path) -> str | None:
    """AUTOMATIC1111 reads `model.yaml` beside `model.safetensors`; `parameterization: "v"` there
    marks a v-prediction model. Only that one line is read (no YAML evaluation)."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and re.search(r"""^\s*parameterization:\s*["']?v["']?\s*$""",
                                    yaml.read_text(encoding="utf-8", errors="replace"), re.M):
        return "v_prediction"
    return None


def _config_from_folder(folder: Path, layout: str) -> SingleFileConfig:
    """Configs from a diffusers folder (diffusers' `from_single_file(config=FOLDER)`)."""
    unet = read_config_file(unet_config_from_diffusers, folder / "unet" / "config.json")
    vae = read_config_file(vae_config_from_diffusers, folder / "vae" / "config.json")
    subs = {"sd1": [""], "sd2": [""], "sdxl": ["", "_2"], "sdxl_refiner": ["_2"]}[layout]
    text, pads = [], []
    for s in subs:
        text.append(read_config_file(clip_config_from_transformers, folder / f"text_encoder{s}" / "config.json",
                                     with_projection=s == "_2"))
        pads.append(read_pad_token(folder / f"tokenizer{s}"))
    index = read_json_object(folder / "model_index.json")
    schedule, scheduler_class = read_schedule(folder)
    return SingleFileConfig(layout, unet, vae, text, pads, schedule,
                            zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", False)),
                            scheduler_class=scheduler_class)


def read_single_file_config(path: str | Path) -> SingleFileConfig | None:
    """Our exporter's `t2i_sd_config` metadata of a safetensors file, or None."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    raw = (check_safetensors_header(path).get("__metadata__") or {}).get(METADATA_KEY)
    return None if raw is None else SingleFileConfig.from_json(raw, f"{path}: {METADATA_KEY} metadata")


def resolve_config(state: dict[str, torch.Tensor], path: Path | None = None, prediction: str | None = None,
                   config: str | Path | None = None) -> SingleFileConfig:
    """The configs for a single file's weights (see the module docstring for the order)."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    layout = detect_layout(state)
    if config is not None:
        cfg = _config_from_folder(Path(config), layout)
    else:
        cfg = read_single_file_config(path) if path is not None else None
    if cfg is not None:
        if cfg.family != layout:
            raise CheckpointError(f"{path}: config describes a {cfg.family} model but the keys are {layout}")
        if prediction is not None:
            cfg.schedule = dataclasses.replace(cfg.schedule, prediction_type=prediction)
        return cfg
    try:
        return _infer_config(state, layout, path, prediction)
    except (KeyError, IndexError, StopIteration) as e:  # a key the layout always has is absent
        raise CheckpointError(f"{path or 'weights'}: not a complete {layout} checkpoint (no {e})") from None


def _infer_config(state: dict[str, torch.Tensor], layout: str, path: Path | None,
                  prediction: str | None) -> SingleFileConfig:
    unet = split_prefix(state, UNET_PREFIX)
    inpainting = unet["input_blocks.0.0.weight"].shape[1] == 9
    if prediction is None and "v_pred" in state:
        prediction = "v_prediction"
    if prediction is None and path is not None:
        prediction = _sidecar_prediction(path)
    if prediction is None:
        prediction = "v_prediction" if layout == "sd2" and not inpainting else "epsilon"
    unet_cfg = infer_unet_config(unet, layout, prediction)
    vae_state = split_prefix(state, VAE_PREFIX)
    if not vae_state:
        raise CheckpointError(f"{path}: no autoencoder keys ({VAE_PREFIX}*)")
    vae_cfg = infer_vae_config(vae_state, layout, unet_cfg.sample_size * 8)
    text = [infer_clip_config(text_state(state, slot, None), slot) for slot in TEXT_SLOTS[layout]]
    return SingleFileConfig(layout, unet_cfg, vae_cfg, text, [s.pad_token for s in TEXT_SLOTS[layout]],
                            default_schedule(prediction, "ztsnr" in state), zero_empty_negative=layout == "sdxl")
