"""diffusers' PixArtAlphaPipeline folder, read into t2i's DiT network (its PixArt-alpha options).

    model_index.json   _class_name PixArtAlphaPipeline
    transformer/       config.json (PixArtTransformer2DModel, or Transformer2DModel with
                       norm_type ada_norm_single as the hub's PixArt-alpha folders name it) + weights
    text_encoder/      T5EncoderModel (t2i.checkpoints.transformers_t5)
    tokenizer/         T5 SentencePiece tokenizer (t2i.text.t5.T5Tokenizer)
    vae/               the SD KL autoencoder (t2i.checkpoints.diffusers_folder.load_vae)
    scheduler/         scheduler_config.json (DPMSolverMultistepScheduler)

The key map is a prefix map, as DiT's (`t2i.checkpoints.diffusers_dit.rename_transformer_key`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from t2i.checkpoints.diffusers_dit import names_pipeline, rename_transformer_key
from t2i.checkpoints.diffusers_nets import check_unsupported
from t2i.nets.dit import DiTConfig

PIPELINE = "PixArtAlphaPipeline"
TEXT_LENGTH = 120  # the pipeline's max_sequence_length: T5 tokens per prompt (PixArt-alpha sec. 3.1)
_UNSUPPORTED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                "attention_bias": True, "attention_type": "default", "dropout": 0.0, "num_vector_embeds": None,
                "only_cross_attention": False, "double_self_attention": False, "use_linear_projection": False}
_EMB = "adaln_single.emb."
# diffusers name (prefix) -> t2i name, block-independent parts
_TOP = {"pos_embed.proj.": "patch_embed.", _EMB + "timestep_embedder.": "t_embed.",
        _EMB + "resolution_embedder.": "size_embed.", _EMB + "aspect_ratio_embedder.": "aspect_embed.",
        "adaln_single.linear.": "t_block.", "caption_projection.linear_1.": "caption_proj.0.",
        "caption_projection.linear_2.": "caption_proj.2.", "scale_shift_table": "final_table"}
# inside transformer_blocks.i -> blocks.i
_BLOCK = {"attn1.": "attn.", "attn2.": "cross_attn.", "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
          "scale_shift_table": "scale_shift_table"}


def is_diffusers_pixart(path: Path) -> bool:
    """A PixArtAlphaPipeline folder (reads its model_index.json only)."""
    return names_pipeline(path, PIPELINE)


def pixart_config_from_diffusers(cfg: dict[str, Any]) -> DiTConfig:
    """DiTConfig from `transformer/config.json`, with diffusers' defaults for what it leaves out
    (use_additional_conditions: on for 128x128 latents; interpolation_scale: sample_size // 64, at
    least 1); ValueError names an option t2i does not implement."""
    check_unsupported(cfg, _UNSUPPORTED, "PixArt transformer config")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    width = heads * head_dim
    if cfg.get("caption_channels") is None:
        raise ValueError("PixArt transformer config: caption_channels is needed (the caption projection)")
    if int(cfg.get("cross_attention_dim", 1152)) != width:
        raise ValueError(f"PixArt transformer config: cross_attention_dim {cfg.get('cross_attention_dim')} is not "
                         f"the width {width} (the captions are projected to the width)")
    c_in = int(cfg.get("in_channels", 4))
    c_out = cfg.get("out_channels", 8) or c_in
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"PixArt transformer config: out_channels {c_out} is neither in_channels nor twice it")
    sample = int(cfg.get("sample_size", 128))
    micro = cfg.get("use_additional_conditions")
    eps = float(cfg.get("norm_eps", 1e-6))
    return DiTConfig(sample_size=sample, patch_size=int(cfg.get("patch_size", 2)), in_channels=c_in, width=width,
                     layers=int(cfg.get("num_layers", 28)), heads=heads, mlp_dim=4 * width, num_classes=0,
                     learn_sigma=c_out == 2 * c_in, mlp_norm_eps=eps, attn_norm_eps=eps, adaln="single",
                     caption_dim=int(cfg["caption_channels"]),
                     micro_conditions=bool(sample == 128 if micro is None else micro), freq_shift=0,
                     pos_scale=float(cfg.get("interpolation_scale") or max(sample // 64, 1)))


def pixart_state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers PixArtTransformer2DModel weights -> t2i DiT names."""
    return {rename_transformer_key(k, _TOP, _BLOCK): v for k, v in state.items()}
