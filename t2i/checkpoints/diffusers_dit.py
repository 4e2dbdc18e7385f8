"""diffusers' DiTPipeline folder, read into t2i's DiT (and written back, for the tiny test model).

    model_index.json   _class_name DiTPipeline (+ id2label: class id -> "name, synonym, ...")
    transformer/       config.json (DiTTransformer2DModel or Transformer2DModel) + weights
    vae/               the SD KL autoencoder (t2i.checkpoints.diffusers_folder.load_vae)
    scheduler/         scheduler_config.json (DiT ships KarrasDiffusionSchedulers: DDIM by default)

diffusers gives every transformer block its own copy of the timestep/class embedding
(`transformer_blocks.i.norm1.emb`, the final layer reads block 0's); DiT has one, and the converted
checkpoints hold the same weights in every copy. t2i keeps one: a folder whose copies differ is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from t2i.checkpoints.diffusers_nets import check_unsupported
from t2i.checkpoints.io import CheckpointError, read_json_object
from t2i.nets.dit import DiTConfig

PIPELINE = "DiTPipeline"
_UNSUPPORTED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                "attention_bias": True, "caption_channels": None, "cross_attention_dim": None,
                "only_cross_attention": False, "num_vector_embeds": None, "double_self_attention": False,
                "use_linear_projection": False}
_EMB = "transformer_blocks.0.norm1.emb."
# diffusers name (prefix) -> t2i name, block-independent parts
_TOP = {"pos_embed.proj.": "patch_embed.", _EMB + "timestep_embedder.": "t_embed.",
        _EMB + "class_embedder.embedding_table.": "class_embed.", "proj_out_1.": "final_ada.",
        "proj_out_2.": "proj_out."}
# inside transformer_blocks.i -> blocks.i
_BLOCK = {"norm1.linear.": "ada.", "attn1.": "attn.", "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2."}


def names_pipeline(path: Path, pipeline: str) -> bool:
    """A folder whose model_index.json names `pipeline` as its _class_name (reads that file only)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return read_json_object(index, "a diffusers model index").get("_class_name") == pipeline
    except (ValueError, OSError):
        return False


def is_diffusers_dit(path: Path) -> bool:
    """A DiTPipeline folder."""
    return names_pipeline(path, PIPELINE)


def dit_config_from_diffusers(cfg: dict[str, Any]) -> DiTConfig:
    """DiTConfig from `transformer/config.json`; ValueError names an option t2i does not implement."""
    check_unsupported(cfg, _UNSUPPORTED, "DiT transformer config")
    if cfg.get("patch_size") is None or cfg.get("num_embeds_ada_norm") is None:
        raise ValueError("DiT transformer config: a patched, class-conditional (num_embeds_ada_norm) model is needed")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    c_in = int(cfg.get("in_channels", 4))
    c_out = cfg.get("out_channels") or c_in
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"DiT transformer config: out_channels {c_out} is neither in_channels nor twice it")
    return DiTConfig(sample_size=int(cfg.get("sample_size", 32)), patch_size=int(cfg["patch_size"]), in_channels=c_in,
                     width=heads * head_dim, layers=int(cfg.get("num_layers", 28)), heads=heads,
                     mlp_dim=4 * heads * head_dim, num_classes=int(cfg["num_embeds_ada_norm"]),
                     learn_sigma=c_out == 2 * c_in, mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)))


def dit_config_to_diffusers(cfg: DiTConfig) -> dict[str, Any]:
    """The DiTTransformer2DModel config.json of cfg (diffusers' MLP width is 4 x width)."""
    if cfg.mlp_dim != 4 * cfg.width or not cfg.null_class:
        raise ValueError("diffusers' DiT has an MLP of 4 x width and a null class")
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": cfg.heads,
            "attention_head_dim": cfg.width // cfg.heads, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "num_layers": cfg.layers, "sample_size": cfg.sample_size,
            "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes, "norm_eps": cfg.mlp_norm_eps,
            "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
            "attention_bias": True}


def rename_transformer_key(key: str, top: dict[str, str], block: dict[str, str]) -> str:
    """A diffusers transformer key -> t2i's DiT name by prefix maps: `top` for the block-independent
    parts, `block` inside `transformer_blocks.i` (-> `blocks.i`). An unknown key is left as is, so
    that the shape check names it."""
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("transformer_blocks."):
        _, i, rest = key.split(".", 2)
        for old, new in block.items():
            if rest.startswith(old):
                return f"blocks.{i}.{new}{rest[len(old):]}"
    return key


def _rename(key: str) -> str | None:
    """A diffusers DiT key -> t2i's, None for the per-block embedding copies past block 0."""
    copy = key.startswith("transformer_blocks.") and key.split(".", 2)[2].startswith("norm1.emb.")
    if copy and not key.startswith(_EMB):
        return None
    return rename_transformer_key(key, _TOP, _BLOCK)


def dit_state_dict_from_diffusers(state: dict[str, torch.Tensor], check_copies: bool = True) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel weights -> t2i DiT names. check_copies: refuse a folder whose
    blocks' embedding copies differ from block 0's (off for meta tensors: there is nothing to compare)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename(key)
        if new is not None:
            out[new] = value
        elif check_copies:
            rest = key.split(".norm1.emb.", 1)[1]
            first = state.get(_EMB + rest)
            if first is None or first.shape != value.shape or not torch.equal(first, value):
                raise CheckpointError(f"{key} differs from block 0's copy; t2i's DiT has one class/time embedding")
    return out


def dit_state_dict_to_diffusers(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """t2i DiT weights -> the diffusers names, the embedding copied into every block as conversions do."""
    top = {new: old for old, new in _TOP.items()}
    block = {new: old for old, new in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            prefix = next(n for n in block if rest.startswith(n))
            out[f"transformer_blocks.{i}.{block[prefix]}{rest[len(prefix):]}"] = value
            continue
        prefix = next(n for n in top if key.startswith(n))
        name = top[prefix] + key[len(prefix):]
        if name.startswith(_EMB):
            for i in range(layers):
                out[name.replace("blocks.0.", f"blocks.{i}.", 1)] = value.clone()
        else:
            out[name] = value
    return out


def read_id2label(root: Path) -> dict[int, str]:
    """The class names: model_index.json's `id2label` (what DiTPipeline takes), else the transformer
    config's; {} when neither has one."""
    for file in (root / "model_index.json", root / "transformer" / "config.json"):
        raw = read_json_object(file, "a diffusers config").get("id2label")
        if raw:
            if not isinstance(raw, dict):
                raise CheckpointError(f"{file}: id2label is not an object")
            try:
                return {int(k): str(v) for k, v in raw.items()}
            except ValueError:
                raise CheckpointError(f"{file}: id2label keys must be class ids") from None
    return {}


def write_dit_transformer(folder: Path, cfg: DiTConfig, state: dict[str, torch.Tensor]) -> None:
    """`folder/` = config.json + diffusion_pytorch_model.safetensors in the diffusers layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dit_config_to_diffusers(cfg), indent=2) + "\n")
    save_file(dit_state_dict_to_diffusers(state, cfg.layers), str(folder / "diffusion_pytorch_model.safetensors"))
