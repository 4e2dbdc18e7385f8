"""CLIP score (Hessel et al. 2021): how well an image matches its prompt, by a CLIP model.

    score(image, text) = 100 * max(cos(E_img(image), E_txt(text)), 0)

averaged over image-prompt pairs (the convention of torchmetrics and of the text-to-image
papers' tables). Any model that embeds images and texts into one space can score: the
`ImageTextEmbedder` protocol is all `clip_score` needs, so a small CLIP trained on the
shapes world plugs in the same way as a released CLIP.

`load_clip(folder)` reads a CLIP checkpoint in the transformers layout (`config.json` of a
`CLIPModel`, `model.safetensors` or `pytorch_model.bin`, the tokenizer's `vocab.json` +
`merges.txt` or `tokenizer.json`, and `preprocessor_config.json` when present) into our
text tower (`t2i.text.clip`) and ViT image tower (`t2i.nets.vit`). transformers' vision
names are mapped here, at the edge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from t2i.checkpoints.io import load_component_weights, on_meta_device
from t2i.checkpoints.transformers_text import clip_text_model_from_transformers, clip_tower_fields
from t2i.nets.vit import VisionTransformer, ViTConfig
from t2i.text.clip import CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SCORE_WEIGHT = 100.0


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """Anything that embeds images and texts into one space (unnormalized is fine)."""

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """N RGB images -> (N, P) embeddings."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> (N, P) embeddings."""
        ...


def cosine_matrix(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, P), (M, P) -> (N, M) cosine similarities."""
    return F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T


def clip_scores(embedder: ImageTextEmbedder, images: Sequence[Image.Image], texts: Sequence[str],
                weight: float = CLIP_SCORE_WEIGHT) -> torch.Tensor:
    """Per-pair CLIP scores, (N,): weight * max(cos(image_i, text_i), 0)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts: CLIP score scores pairs")
    img, txt = embedder.embed_images(images), embedder.embed_texts(texts)  # (N, P) each
    cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)  # (N,)
    return weight * cos.clamp(min=0)


def clip_score(embedder: ImageTextEmbedder, images: Sequence[Image.Image], texts: Sequence[str],
               weight: float = CLIP_SCORE_WEIGHT) -> float:
    """Mean CLIP score over image-text pairs."""
    return float(clip_scores(embedder, images, texts, weight).mean())


# ---------------------------------------------------------------------------- image input


@dataclass
class CLIPImagePreprocess:
    """CLIP's image preprocessing: shortest side to `size` (bicubic), centre crop `crop_size`,
    [0, 1], then (x - mean) / std per channel, as transformers' `CLIPImageProcessor` does."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resample: int = Image.BICUBIC

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """RGB images of any size -> (B, 3, crop_size, crop_size) float32."""
        return torch.stack([self._one(im) for im in images])

    def _one(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        im = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.size * long / short)
        im = im.resize((self.size, new_long) if w <= h else (new_long, self.size), resample=self.resample)
        w, h = im.size
        top, left = (h - self.crop_size) // 2, (w - self.crop_size) // 2
        im = im.crop((left, top, left + self.crop_size, top + self.crop_size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, S, S)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (x - mean) / std

    @classmethod
    def from_config(cls, d: dict, image_size: int) -> CLIPImagePreprocess:
        """A transformers `preprocessor_config.json` dict (sizes as ints or dicts)."""
        size = d.get("size", image_size)
        size = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
        crop = d.get("crop_size", image_size)
        crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
        return cls(size=int(size), crop_size=int(crop), mean=tuple(d.get("image_mean", OPENAI_MEAN)),
                   std=tuple(d.get("image_std", OPENAI_STD)), resample=int(d.get("resample", Image.BICUBIC)))


# ---------------------------------------------------------------------------- the model


class CLIP(nn.Module):
    """A CLIP model as an `ImageTextEmbedder`: tokenizer + text tower, preprocessing + image tower."""

    def __init__(self, text: CLIPTextModel, vision: VisionTransformer, tokenizer: CLIPTokenizer,
                 preprocess: CLIPImagePreprocess | None = None, logit_scale: float = 100.0) -> None:
        super().__init__()
        if text.text_projection is None or vision.projection is None:
            raise ValueError("CLIP score needs both towers with their projections into the joint space")
        self.text, self.vision, self.tokenizer = text, vision, tokenizer
        self.preprocess = preprocess or CLIPImagePreprocess(vision.cfg.image_size, vision.cfg.image_size)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(N, P) image embeddings (projected, not normalized), in batches of batch_size."""
        dtype = self.vision.patch_embedding.weight.dtype
        out = [self.vision(self.preprocess(images[i : i + batch_size]).to(dtype)).image_embeds.float()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """(N, P) text embeddings (projected, not normalized); texts longer than the
        window are cut, as every CLIP score implementation does."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer.tokenize(list(texts[i : i + batch_size]), max_length=self.text.cfg.max_positions).ids
            out.append(self.text(ids).text_embeds.float())
        return torch.cat(out)


# ---------------------------------------------------------------------------- transformers layout

# (transformers name under `vision_model.`, t2i VisionTransformer name), whole parameter names.
VISION_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "patch_embedding.weight",
    "embeddings.position_embedding.weight": "position_embedding.weight",
    "pre_layrnorm.weight": "pre_norm.weight",
    "pre_layrnorm.bias": "pre_norm.bias",
    "post_layernorm.weight": "post_norm.weight",
    "post_layernorm.bias": "post_norm.bias",
}
VISION_LAYER = {
    "self_attn.q_proj": "attn.to_q",
    "self_attn.k_proj": "attn.to_k",
    "self_attn.v_proj": "attn.to_v",
    "self_attn.out_proj": "attn.to_out.0",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def vision_state_dict_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel / CLIPVisionModelWithProjection state dict -> VisionTransformer keys.

    Text-side keys are skipped; an unknown vision key is an error that names it.
    """
    out, unknown = {}, []
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["projection.weight"] = value
            continue
        if not key.startswith("vision_model."):
            continue
        key = key[len("vision_model.") :]
        if key in VISION_TOP:
            out[VISION_TOP[key]] = value
        elif key == "embeddings.position_ids":
            continue
        elif (m := _LAYER_KEY.match(key)) and m.group(2) in VISION_LAYER:
            out[f"layers.{m.group(1)}.{VISION_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected CLIP vision keys: {unknown[:8]}")
    return out


def vision_config_from_transformers(d: dict) -> ViTConfig:
    """A transformers `CLIPConfig` dict (its `vision_config` and `projection_dim`) -> ViTConfig."""
    v = d.get("vision_config", d)
    return ViTConfig(
        **clip_tower_fields(v, "vision"),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        channels=v.get("num_channels", 3),
        projection_dim=d.get("projection_dim", v.get("projection_dim", 512)),
    )


def load_clip(folder: str | Path, dtype: torch.dtype = torch.float32) -> CLIP:
    """A CLIP checkpoint folder in the transformers layout -> CLIP (eval mode).

    The tokenizer is read from the folder itself or its `tokenizer/` subfolder.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a CLIP folder holds config.json, model weights "
                                "and tokenizer files, as transformers' CLIPModel.save_pretrained writes them")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "vision_config" not in config or "text_config" not in config:
        raise ValueError(f"{config_file}: not a CLIPModel config (needs text_config and vision_config)")
    stem = "model" if any(folder.glob("model*.safetensors")) else "pytorch_model"
    state = load_component_weights(folder, stem)
    if "visual_projection.weight" not in state or "text_projection.weight" not in state:
        raise KeyError(f"{folder}: CLIP score needs both projections (visual_projection, text_projection)")
    text = clip_text_model_from_transformers({**config, "architectures": ["CLIPModel"]}, state, dtype)
    vision_cfg = vision_config_from_transformers(config)
    with on_meta_device():
        vision = VisionTransformer(vision_cfg)
    vision.load_state_dict(vision_state_dict_from_transformers(state), strict=True, assign=True)
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    tokenizer = CLIPTokenizer.from_folder(tok_dir)
    pre_file = folder / "preprocessor_config.json"
    preprocess = (CLIPImagePreprocess.from_config(json.loads(pre_file.read_text(encoding="utf-8")),
                                                  vision_cfg.image_size)
                  if pre_file.is_file() else CLIPImagePreprocess(vision_cfg.image_size, vision_cfg.image_size))
    scale = float(state["logit_scale"].exp()) if "logit_scale" in state else 100.0
    return CLIP(text.eval(), vision.to(dtype).eval(), tokenizer, preprocess, scale).eval()
