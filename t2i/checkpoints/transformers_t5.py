"""transformers' T5 encoder <-> t2i's `T5Encoder`: config translation and the state-dict key map.

Reads the `config.json` and weights of a `T5EncoderModel` folder (DeepFloyd IF's and PixArt's
`text_encoder/`, possibly sharded or in an fp16 variant) and also the encoder half of a full
`T5ForConditionalGeneration` (its decoder and LM head are skipped). The token embedding is
stored as `shared.weight`, `encoder.embed_tokens.weight` or both (tied): either is read.
This is the only place that knows transformers' T5 names (SelfAttention.q, DenseReluDense, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from t2i.checkpoints.io import load_component_weights
from t2i.checkpoints.transformers_text import build_text_model, map_text_state_dict, read_config
from t2i.text.t5 import T5Config, T5Encoder

# (transformers name, t2i name); keys are read after their `encoder.` prefix is removed.
T5_TOP = [
    ("shared", "token_embedding"),
    ("embed_tokens", "token_embedding"),
    # only the first block owns the relative-position table; every layer uses it
    ("block.0.layer.0.SelfAttention.relative_attention_bias", "relative_bias"),
    ("final_layer_norm", "final_norm"),
]
T5_LAYER = [
    ("layer.0.SelfAttention.q", "attn.to_q"),
    ("layer.0.SelfAttention.k", "attn.to_k"),
    ("layer.0.SelfAttention.v", "attn.to_v"),
    ("layer.0.SelfAttention.o", "attn.to_out.0"),
    ("layer.0.layer_norm", "norm1"),
    ("layer.1.DenseReluDense.wi", "mlp.wi"),  # plain feed-forward
    ("layer.1.DenseReluDense.wi_0", "mlp.wi"),  # gated: the activated branch
    ("layer.1.DenseReluDense.wi_1", "mlp.gate"),  # gated: the linear branch
    ("layer.1.DenseReluDense.wo", "mlp.wo"),
    ("layer.1.layer_norm", "norm2"),
]
T5_LAYER_PREFIX = ("block.", "layers.")
T5_IGNORED = re.compile(r"^(decoder\..*|lm_head\..*)$")

# transformers' activation names -> ours; "gated-gelu" means gelu_new (tanh), other names as written
T5_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def t5_state_dict_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5EncoderModel (or T5ForConditionalGeneration) weights -> t2i T5Encoder keys."""
    return map_text_state_dict(state, ("encoder.",), T5_TOP, T5_LAYER, T5_LAYER_PREFIX, T5_IGNORED)


def t5_config_from_transformers(d: dict) -> T5Config:
    """A transformers `T5Config` dict -> ours; missing fields take transformers' defaults (t5-small).

    The activation follows `feed_forward_proj` as transformers derives it: "gated-gelu" is the
    gated tanh-GELU of T5 v1.1, "relu" the original T5 feed-forward."""
    proj = d.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"unsupported T5 feed_forward_proj {proj!r}")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if act not in T5_ACTIVATIONS:
        raise ValueError(f"unsupported T5 activation {act!r} (from feed_forward_proj {proj!r})")
    d_model = d.get("d_model", 512)
    heads = d.get("num_heads", 8)
    return T5Config(
        vocab_size=d.get("vocab_size", 32128),
        width=d_model,
        head_dim=d.get("d_kv", 64),
        mlp_dim=d.get("d_ff", 2048),
        layers=d.get("num_layers", 6),
        heads=heads,
        relative_buckets=d.get("relative_attention_num_buckets", 32),
        relative_max_distance=d.get("relative_attention_max_distance", 128),
        layer_norm_eps=d.get("layer_norm_epsilon", 1e-6),
        gated=parts[0] == "gated",
        activation=T5_ACTIVATIONS[act],
    )


def t5_encoder_from_transformers(
    config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> T5Encoder:
    """Build our T5Encoder from a transformers config dict and state dict."""
    return build_text_model(T5Encoder, t5_config_from_transformers(config), t5_state_dict_from_transformers(state),
                            dtype)


def load_t5_folder(folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> T5Encoder:
    """A transformers T5 folder (IF's / PixArt's `text_encoder/`): config.json + model weights,
    frozen (eval, no grad)."""
    folder = Path(folder)
    stem = "model" if any(folder.glob("model*")) else "pytorch_model"
    model = t5_encoder_from_transformers(read_config(folder), load_component_weights(folder, stem, variant), dtype)
    return model.eval().requires_grad_(False)
