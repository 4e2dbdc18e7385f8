"""Single-file Stable Diffusion checkpoints in the original (CompVis / Stability AI) key layout.

One `.safetensors` (or `.ckpt`) holds the whole pipeline under these prefixes:

    model.diffusion_model.*                 U-Net (input_blocks / middle_block / output_blocks)
    first_stage_model.*                     KL autoencoder (encoder.down.i.block.j, mid.attn_1 ...)
    cond_stage_model.transformer.*          SD 1.x: OpenAI CLIP ViT-L/14, transformers layout
    cond_stage_model.model.*                SD 2.x: OpenCLIP ViT-H/14 (in_proj_weight, resblocks)
    conditioner.embedders.0.transformer.*   SDXL base: CLIP ViT-L/14, transformers layout
    conditioner.embedders.1.model.*         SDXL base: OpenCLIP ViT-bigG/14
    conditioner.embedders.0.model.*         SDXL refiner: OpenCLIP ViT-bigG/14 only

The family is read from which text-encoder prefixes exist; a 9-channel `input_blocks.0.0`
marks an inpainting U-Net. Key maps are data (module pairs built from the config) applied by
one small function in each direction; nothing outside `checkpoints/` knows these names.

Configs are resolved in this order: a diffusers folder given as `config` (as diffusers'
`from_single_file(config=...)`), else the `t2i_sd_config` metadata our exporter writes, else
inference from the keys and shapes plus the released-model constants that weights cannot show
(head counts: 8 per level for SD1, 64-wide heads otherwise; GroupNorm 32; VAE scaling 0.18215,
SDXL 0.13025; CLIP heads 64 wide).

Prediction type (eps vs v cannot be told from weights): the `prediction` argument, else our
metadata, else a `v_pred` key in the file (ComfyUI's marker), else a sidecar `FILE.yaml` with
`parameterization: "v"` (AUTOMATIC1111's convention), else the family default diffusers uses:
v-prediction for SD 2.x (the 768-v models, e.g. SD 2.1), epsilon for SD 2.x inpainting, SD 1.x
and SDXL. SD 2.x *base* (512 px) checkpoints are epsilon: pass `prediction="epsilon"`.
A `ztsnr` key (ComfyUI) turns on the zero-terminal-SNR rescale.

SD 2.x reads OpenCLIP's penultimate layer: released files hold 24 resblocks and the 24th is
dropped on load (as diffusers does). Our exporter writes the 23 used layers plus an all-zero
24th, which is an exact identity block (pre-norm residual: every branch outputs zero), so any
tool reading "the penultimate of 24" computes what we compute.
Tokenizer: single files carry none; the CLIP vocabulary shipped in t2i/assets/clip is used
(`CLIPTokenizer.default()`), padding with "!" for OpenCLIP towers (SD2, SDXL's 2nd encoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.kl import AutoencoderKL, AutoencoderKLConfig
from t2i.checkpoints.io import CheckpointError, check_safetensors_header, load_state_dict
from t2i.checkpoints.openclip import openclip_from_ours, openclip_to_ours
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.unet import UNet, UNetConfig
from t2i.systems.latent_diffusion import GenerationDefaults, LatentDiffusionPipeline
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import EOS, CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
METADATA_KEY = "t2i_sd_config"
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
PREDICTIONS = ("epsilon", "v_prediction")


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
    from t2i.checkpoints.transformers_text import clip_state_dict_from_transformers

    return clip_state_dict_from_transformers(state)


def text_from_ours(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "openclip":
        return openclip_from_ours(state)
    from t2i.checkpoints.transformers_text import clip_state_dict_to_transformers

    return clip_state_dict_to_transformers(state, prefixed=True)


# ============================================================================ detection


def detect_family(state: dict[str, Any]) -> str:
    """"sd1", "sd2", "sdxl" or "sdxl_refiner", from which text-encoder prefixes the keys carry."""
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


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _indices(keys: list[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(unet: dict[str, torch.Tensor], family: str, prediction: str) -> UNetConfig:
    """UNetConfig from original-layout U-Net keys (prefix removed) and shapes. Head counts and
    GroupNorm groups do not show in weights: they follow the released models (see module doc)."""
    keys = list(unet)
    levels = [{"c": 0, "n": 0, "attn": False, "depth": 1}]  # one per level, from the top down
    for k in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{k}.0.op.weight" in unet:  # a downsampler closes the level
            levels.append({"c": 0, "n": 0, "attn": False, "depth": 1})
            continue
        level = levels[-1]
        level["c"] = unet[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0]
        level["n"] += 1
        blocks = _indices(keys, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")
        if blocks:
            level["attn"], level["depth"] = True, len(blocks)
    channels = [lv["c"] for lv in levels]
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if not levels[-1]["attn"] and mid_depth:  # the mid block takes the last level's depth
        levels[-1]["depth"] = mid_depth
    to_k = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in unet.items() if k.endswith(".1.proj_in.weight"))
    heads = [8] * len(channels) if family == "sd1" else [max(c // 64, 1) for c in channels]
    label = unet.get("label_emb.0.0.weight")
    temb = unet["time_embed.0.weight"].shape[0]
    size = {"sd1": 64, "sd2": 96 if prediction == "v_prediction" else 64}.get(family, 128)
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


def infer_vae_config(vae: dict[str, torch.Tensor], family: str, sample_size: int) -> AutoencoderKLConfig:
    """AutoencoderKLConfig from original-layout keys (prefix removed) and shapes."""
    keys = list(vae)
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    channels = tuple(vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels)
    return AutoencoderKLConfig(
        in_channels=vae["encoder.conv_in.weight"].shape[1],
        out_channels=vae["decoder.conv_out.weight"].shape[0],
        block_channels=channels,
        layers_per_block=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=vae["decoder.conv_in.weight"].shape[1],
        mid_attention="encoder.mid.attn_1.q.weight" in vae,
        scaling_factor=0.13025 if family.startswith("sdxl") else 0.18215,
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
        vocab_size=vocab, width=width, layers=len(_indices(list(ours), r"layers\.(\d+)\.")),
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


# ============================================================================ resolved description


@dataclass
class SingleFileConfig:
    """Everything a single file does not say in its weights: the resolved configs of its parts.

    Stored as JSON in the safetensors metadata under `t2i_sd_config` by our exporter.
    """

    family: str
    unet: UNetConfig
    vae: AutoencoderKLConfig
    text: list[CLIPTextConfig]
    pad_tokens: list[str]
    schedule: ScheduleConfig
    defaults: GenerationDefaults
    zero_empty_negative: bool = False

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        # JSON has no infinity; a dropped field takes its (infinite) default again on reading.
        d["schedule"] = {k: v for k, v in d["schedule"].items() if not (isinstance(v, float) and math.isinf(v))}
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str) -> SingleFileConfig:
        d = json.loads(raw)
        if d.get("family") not in FAMILIES:
            raise CheckpointError(f"{METADATA_KEY} metadata names an unknown family {d.get('family')!r}")
        return cls(family=d["family"], unet=UNetConfig(**d["unet"]), vae=AutoencoderKLConfig(**d["vae"]),
                   text=[CLIPTextConfig(**t) for t in d["text"]], pad_tokens=list(d["pad_tokens"]),
                   schedule=ScheduleConfig(**d["schedule"]), defaults=GenerationDefaults(**d["defaults"]),
                   zero_empty_negative=bool(d.get("zero_empty_negative", False)))


def _family_defaults(family: str, sample_size: int) -> GenerationDefaults:
    xl = family.startswith("sdxl")
    size = sample_size * 8
    return GenerationDefaults(sampler="euler", steps=30 if xl else 20, guidance=5.0 if xl else 7.5,
                              width=size, height=size)


def _sidecar_prediction(path: Path) -> str | None:
    """AUTOMATIC1111 reads `model.yaml` beside `model.safetensors`; `parameterization: "v"` there
    marks a v-prediction model. Only that one line is read (no YAML evaluation)."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and re.search(r"""^\s*parameterization:\s*["']?v["']?\s*$""",
                                    yaml.read_text(encoding="utf-8", errors="replace"), re.M):
        return "v_prediction"
    return None


def _config_from_folder(folder: Path, family: str) -> SingleFileConfig:
    """Configs from a diffusers folder (diffusers' `from_single_file(config=FOLDER)`)."""
    from t2i.checkpoints.diffusers_folder import SCHEDULER_SAMPLERS, _read_json
    from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
    from t2i.checkpoints.diffusers_scheduler import read_scheduler_config
    from t2i.checkpoints.transformers_text import clip_config_from_transformers
    from t2i.text.clip_tokenizer import _read_pad_token

    unet = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    subs = {"sd1": [""], "sd2": [""], "sdxl": ["", "_2"], "sdxl_refiner": ["_2"]}[family]
    text, pads = [], []
    for s in subs:
        d = _read_json(folder / f"text_encoder{s}" / "config.json")
        text.append(clip_config_from_transformers(d, with_projection=s == "_2"))
        pads.append(_read_pad_token(folder / f"tokenizer{s}"))
    index = _read_json(folder / "model_index.json")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    defaults = _family_defaults(family, unet.sample_size)
    defaults.sampler = SCHEDULER_SAMPLERS.get(sched.get("_class_name", ""), "euler")
    defaults.width = defaults.height = unet.sample_size * vae.downsample_factor
    return SingleFileConfig(family, unet, vae, text, pads, read_scheduler_config(folder), defaults,
                            bool(index.get("force_zeros_for_empty_prompt", False)))


def read_single_file_config(path: str | Path) -> SingleFileConfig | None:
    """Our exporter's `t2i_sd_config` metadata of a safetensors file, or None."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    raw = (check_safetensors_header(path).get("__metadata__") or {}).get(METADATA_KEY)
    return None if raw is None else SingleFileConfig.from_json(raw)


def resolve_config(state: dict[str, torch.Tensor], path: Path | None = None, prediction: str | None = None,
                   config: str | Path | None = None) -> SingleFileConfig:
    """The configs for a single file's weights (see the module docstring for the order)."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    family = detect_family(state)
    if config is not None:
        cfg = _config_from_folder(Path(config), family)
    else:
        cfg = read_single_file_config(path) if path is not None else None
    if cfg is not None:
        if cfg.family != family:
            raise CheckpointError(f"{path}: config describes a {cfg.family} model but the keys are {family}")
        if prediction is not None:
            cfg.schedule = dataclasses.replace(cfg.schedule, prediction_type=prediction)
        return cfg
    unet = _split(state, UNET_PREFIX)
    inpainting = unet["input_blocks.0.0.weight"].shape[1] == 9
    if prediction is None and "v_pred" in state:
        prediction = "v_prediction"
    if prediction is None and path is not None:
        prediction = _sidecar_prediction(path)
    if prediction is None:
        prediction = "v_prediction" if family == "sd2" and not inpainting else "epsilon"
    unet_cfg = infer_unet_config(unet, family, prediction)
    vae_state = _split(state, VAE_PREFIX)
    if not vae_state:
        raise CheckpointError(f"{path}: no autoencoder keys ({VAE_PREFIX}*)")
    vae_cfg = infer_vae_config(vae_state, family, unet_cfg.sample_size * 8)
    text = [infer_clip_config(_text_state(state, slot, None), slot) for slot in TEXT_SLOTS[family]]
    return SingleFileConfig(family, unet_cfg, vae_cfg, text, [s.pad_token for s in TEXT_SLOTS[family]],
                            default_schedule(prediction, "ztsnr" in state),
                            _family_defaults(family, unet_cfg.sample_size),
                            zero_empty_negative=family == "sdxl")


def _text_state(state: dict[str, torch.Tensor], slot: TextSlot, cfg: CLIPTextConfig | None) -> dict[str, torch.Tensor]:
    """One text encoder's weights under our keys, cut to the layers the config uses (SD2's file
    holds one more than it reads) and without a projection the config does not have."""
    ours = text_to_ours(_split(state, slot.prefix), slot.layout)
    n = len(_indices(list(ours), r"layers\.(\d+)\."))
    keep = cfg.layers if cfg is not None else n - int(slot.cut_last)
    has_projection = cfg.projection_dim is not None if cfg is not None else not slot.cut_last
    return {k: v for k, v in ours.items()
            if not (k.startswith("layers.") and int(k.split(".")[1]) >= keep)
            and (has_projection or not k.startswith("text_projection"))}


# ============================================================================ load


def _build(cls: type, cfg: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> Any:
    """Construct in `dtype` and copy the file's tensors in (a cast only if the dtypes differ).
    Not on the meta device: some modules precompute constants (timestep frequencies) in __init__."""
    module = cls(cfg).to(dtype)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what}: weights do not fit the config: {len(missing)} missing (e.g. "
                              f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return module.eval().requires_grad_(False)


def pipeline_from_state_dict(state: dict[str, torch.Tensor], cfg: SingleFileConfig, dtype: torch.dtype | None = None,
                             name: str = "model") -> LatentDiffusionPipeline:
    """Build a LatentDiffusionPipeline from original-layout weights and their resolved config.

    dtype None keeps the dtype the U-Net weights are stored in."""
    unet_state = unet_from_original(_split(state, UNET_PREFIX), cfg.unet)
    if dtype is None:
        dtype = next(iter(unet_state.values())).dtype
    unet = _build(UNet, cfg.unet, unet_state, dtype, f"{name}: U-Net")
    vae = _build(AutoencoderKL, cfg.vae, vae_from_original(_split(state, VAE_PREFIX), cfg.vae), dtype,
                 f"{name}: autoencoder")
    slots = TEXT_SLOTS[cfg.family]
    if len(cfg.text) != len(slots):
        raise CheckpointError(f"{name}: {len(cfg.text)} text encoder configs for a {cfg.family} model")
    encoders = []
    for i, (slot, tcfg, pad) in enumerate(zip(slots, cfg.text, cfg.pad_tokens, strict=True)):
        model = _build(CLIPTextModel, tcfg, _text_state(state, slot, tcfg), dtype, f"{name}: text encoder {i}")
        if cfg.family in ("sd1", "sd2"):
            encoders.append(CLIPTextEncoder(CLIPTokenizer.default(pad), model, "last"))
        else:
            pooled = "text_embeds" if i == len(slots) - 1 else "none"
            encoders.append(CLIPTextEncoder(CLIPTokenizer.default(pad), model, "penultimate", pooled))
    text_encoder = encoders[0] if cfg.family in ("sd1", "sd2") else SDXLTextEncoder(encoders)
    return LatentDiffusionPipeline(unet, vae, text_encoder, cfg.schedule, name=name, defaults=cfg.defaults,
                                   micro_conditioning=unet.add_embedding is not None,
                                   zero_empty_negative=cfg.zero_empty_negative)


def load_single_file(path: str | Path, *, prediction: str | None = None, config: str | Path | None = None,
                     dtype: torch.dtype | None = torch.float32) -> LatentDiffusionPipeline:
    """A single-file SD 1.x / 2.x / XL (base, refiner, inpainting) checkpoint -> pipeline.

    Args:
        path: `.safetensors`, or `.ckpt`/`.pt`/`.bin` (read with `torch.load(weights_only=True)`).
        prediction: "epsilon" or "v_prediction", overriding every other source.
        config: a diffusers folder whose config.json files describe the nets (needed for
            models whose head counts or GroupNorm groups differ from the released ones).
        dtype: weights dtype; None keeps the file's.
    """
    path = Path(path)
    state = load_state_dict(path)
    cfg = resolve_config(state, path, prediction, config)
    return pipeline_from_state_dict(state, cfg, dtype, name=path.stem)


def is_single_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
