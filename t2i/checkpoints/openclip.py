"""OpenCLIP's text-tower key layout (SD 2.x `cond_stage_model.model.*`, SDXL's bigG tower)
<-> our CLIPTextModel keys.

OpenCLIP differs from transformers' CLIP in three ways that matter for weights: attention
q/k/v are one `in_proj_weight` (3D, D) (split into to_q/to_k/to_v here), `text_projection`
is a bare (D, P) matrix used as `x @ P` (ours is a Linear weight (P, D), so transposed), and
the position table is a bare `positional_embedding` (T, D).
"""

from __future__ import annotations

import re

import torch

from t2i.checkpoints.io import CheckpointError

OPENCLIP_TOP = [("token_embedding.weight", "token_embedding.weight"),
                ("positional_embedding", "position_embedding.weight"),
                ("ln_final.weight", "final_norm.weight"), ("ln_final.bias", "final_norm.bias")]
OPENCLIP_LAYER = [("ln_1", "norm1"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                  ("attn.out_proj", "attn.to_out.0")]
# Present in OpenCLIP files but not part of the text tower we run.
OPENCLIP_IGNORED = re.compile(r"^(logit_scale|attn_mask)$")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text keys (prefix removed) -> our CLIPTextModel keys: `in_proj_weight` (3D, D)
    split into to_q/to_k/to_v, `text_projection` (D, P) transposed into a Linear weight (P, D)."""
    top = dict(OPENCLIP_TOP)
    layer = dict(OPENCLIP_LAYER)
    out, unknown = {}, []
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")) and key.startswith("transformer.resblocks."):
            i = key.split(".")[2]
            leaf = "weight" if key.endswith("weight") else "bias"
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"layers.{i}.attn.{name}.{leaf}"] = part.contiguous()
        elif (m := _RESBLOCK.match(key)) and m.group(2) in layer:
            out[f"layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
        elif not OPENCLIP_IGNORED.match(key):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"OpenCLIP text encoder: unexpected keys {unknown[:5]}")
    return out


def openclip_from_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIPTextModel keys -> OpenCLIP text keys (the inverse of `openclip_to_ours`)."""
    top = {b: a for a, b in OPENCLIP_TOP}
    layer = {b: a for a, b in OPENCLIP_LAYER}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif (m := re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", key)) and m.group(2) in layer:
            out[f"transformer.resblocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) == "attn.to_q":
            i, leaf = m.group(1), m.group(3)
            qkv = [state[f"layers.{i}.attn.{n}.{leaf}"] for n in ("to_q", "to_k", "to_v")]
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(qkv, dim=0)
        elif not (m and m.group(2) in ("attn.to_k", "attn.to_v")):
            raise KeyError(f"not a t2i CLIPTextModel key: {key!r}")
    return out


def identity_openclip_layer(index: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-zero OpenCLIP resblock `index` shaped like resblock 0 of `like`: an exact identity
    (zero LayerNorm scales and biases make both residual branches output 0)."""
    return {k.replace("resblocks.0.", f"resblocks.{index}.", 1): torch.zeros_like(v)
            for k, v in like.items() if k.startswith("transformer.resblocks.0.")}
