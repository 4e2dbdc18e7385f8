"""A small CLIP (Radford et al. 2021; seed 000, 4.2.1) for the shapes world: scores, reranking, shapes FID.

Two towers map an image and a caption into one space; training pulls each image towards
its own caption and away from the other captions of the batch (InfoNCE, both directions,
with a learned temperature). Released CLIPs cannot be downloaded here and know nothing of
flat coloured shapes, so this one is trained on the shapes world (`t2i train clip`) and
shipped in t2i/assets/shapes_clip/ (a few MB).

- Image tower: a tiny ViT from `t2i.nets.vit` (64x64 pixels, 8x8 patches -> 64 tokens).
  A ViT rather than a small conv net because the captions are about relations between
  objects anywhere in the frame ("a red circle above a blue square", counts): full
  attention with learned positions relates any two patches in one layer, where a conv net
  needs depth (or a flattening head) to reach across 64 px; and the tower is the same code
  as the released CLIPs' image towers, which `t2i.eval.clip_score` already tests.
- Text tower: `t2i.text.clip.CLIPTextModel` (causal, pooled at the end-of-text token) over a
  word-level vocabulary of the shapes caption language (~60 words) instead of CLIP's 49,408
  BPE tokens: the BPE embedding table alone would be 25 MB at width 128, for a language
  whose every word is known in advance. Unknown words map to <unk>.
- The config, vocabulary included, is stored in the safetensors metadata.

`ShapesCLIP` is an `ImageTextEmbedder` (t2i.eval.clip_score), so `clip_scores`, the reranker
(t2i.eval.rerank) and `shapes_fid` take it directly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from t2i.data import captions as lang
from t2i.nets.vit import VisionTransformer, ViTConfig
from t2i.text.clip import CLIPTextConfig, CLIPTextModel

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "shapes_clip")
DEFAULT_PATH = os.path.join(ASSET_DIR, "shapes_clip.safetensors")
METADATA_KEY = "t2i_shapes_clip"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def shapes_vocabulary() -> tuple[str, ...]:
    """Every word of the shapes caption language (t2i.data.captions), specials first, then sorted."""
    words: set[str] = {",", "and", "with", "on", "a", "an", "is", "background"}
    words |= set(lang.COLOURS) | set(lang.SHAPES) | set(lang.PLURALS.values()) | set(lang.SIZE_WORDS)
    words |= set(lang.BACKGROUNDS) | set(lang.NUMBER_WORDS) | set(lang.REGION_FILLER)
    for phrase in (*lang.RELATION_PHRASES, *lang.PREFIXES, *(p for ps in lang.REGION_PHRASES.values() for p in ps)):
        words |= set(phrase.split())
    for template in (*lang.SINGLE_TEMPLATES, *lang.REGION_TEMPLATES, *lang.BINDING_TEMPLATES,
                     *lang.RELATION_TEMPLATES, *lang.COUNTING_TEMPLATES):
        words |= {w for w in template.split() if not w.startswith("{")}
    return SPECIALS + tuple(sorted(words))


def split_words(text: str) -> list[str]:
    """Lower-case words with commas as their own token: 'A red circle, a cube.' -> [a, red, circle, ',', a, cube]."""
    return text.lower().strip().rstrip(".").replace(",", " , ").split()


class WordTokenizer:
    """Word-level tokenizer: <bos> words <eos>, padded with <pad> to the longest text of a batch."""

    def __init__(self, vocab: Sequence[str], max_length: int) -> None:
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"the vocabulary must start with {SPECIALS}")
        self.vocab, self.max_length = tuple(vocab), max_length
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> (N, T) int64 ids, T <= max_length. Longer texts are cut (the end token kept),
        as every CLIP score implementation cuts at its context window."""
        rows = []
        for text in texts:
            ids = [self.index.get(w, UNK) for w in split_words(text)][: self.max_length - 2]
            rows.append([BOS, *ids, EOS])
        out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out


@dataclass
class ShapesCLIPConfig:
    """Shape of a shapes CLIP. Defaults: the shipped model (~1.5M parameters, ~6 MB in fp32)."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_tokens: int = 32
    embed_dim: int = 128  # joint image-text space
    init_temperature: float = 0.07  # CLIP's initial softmax temperature (logit scale 1 / 0.07)
    max_logit_scale: float = 100.0  # CLIP clips the learned scale here for stability
    vocab: list[str] = field(default_factory=lambda: list(shapes_vocabulary()))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShapesCLIPConfig:
        return cls(**d)

    def vision_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
                         layers=self.vision_layers, heads=self.vision_heads, mlp_dim=4 * self.vision_width,
                         activation="gelu", projection_dim=self.embed_dim)

    def text_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(self.vocab), width=self.text_width, layers=self.text_layers,
                              heads=self.text_heads, mlp_dim=4 * self.text_width, max_positions=self.max_tokens,
                              activation="gelu", projection_dim=self.embed_dim, eos_token_id=EOS,
                              pooling="first_eos")


def to_pixels(images: Sequence[Image.Image | np.ndarray], size: int) -> torch.Tensor:
    """RGB images (PIL or (H, W, 3) uint8) -> (N, 3, size, size) float32 in [-1, 1].

    Other sizes are resized (box filter when shrinking, bicubic when enlarging); non-square
    images are squashed, as the shapes judge reads square canvases only.
    """
    out = []
    for im in images:
        im = im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BOX if min(im.size) > size else Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1))  # (3, S, S)
    return torch.stack(out).div(127.5).sub(1.0)


class ShapesCLIP(nn.Module):
    """Image and text towers into a joint space, and the learned logit scale (log 1 / temperature)."""

    def __init__(self, cfg: ShapesCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision_config())
        self.text = CLIPTextModel(cfg.text_config())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        self.tokenizer = WordTokenizer(cfg.vocab, cfg.max_tokens)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """CLIP's scheme, scaled to small widths: embeddings N(0, 0.02), positions N(0, 0.01),
        projections N(0, width^-0.5). Linear layers keep torch's default (Kaiming-uniform)."""
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.position_embedding.weight, std=0.01)
        nn.init.normal_(self.vision.position_embedding.weight, std=0.01)
        nn.init.normal_(self.text.text_projection.weight, std=self.cfg.text_width**-0.5)
        nn.init.normal_(self.vision.projection.weight, std=self.cfg.vision_width**-0.5)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, P) unit-norm image embeddings."""
        return F.normalize(self.vision(pixels).image_embeds, dim=-1)

    def encode_texts(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, P) unit-norm text embeddings."""
        return F.normalize(self.text(ids).text_embeds, dim=-1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels, (B', T) ids -> (B, B') logits = exp(logit_scale) * cosine."""
        scale = self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()
        return scale * self.encode_images(pixels) @ self.encode_texts(ids).T

    # ------------------------------------------------------------------ ImageTextEmbedder

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        """N RGB images (any size; resized to cfg.image_size) -> (N, P) unit-norm embeddings."""
        return torch.cat([self.encode_images(to_pixels(images[i: i + batch_size], self.cfg.image_size))
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """N texts -> (N, P) unit-norm embeddings."""
        return torch.cat([self.encode_texts(self.tokenizer.encode(texts[i: i + batch_size]))
                          for i in range(0, len(texts), batch_size)])

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        """(N, vision_width) pooled image features (the normed class token, before the projection):
        the space of shapes FID, as Inception's pool features are FID's."""
        return torch.cat([self.vision(to_pixels(images[i: i + batch_size], self.cfg.image_size)).pooled
                          for i in range(0, len(images), batch_size)])

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """Weights as safetensors (fp32), the config (with the vocabulary) as JSON metadata."""
        from t2i.checkpoints.io import save_state_dict

        state = {k: v.detach().float().contiguous().clone() for k, v in self.state_dict().items()}
        save_state_dict(state, path, metadata={METADATA_KEY: json.dumps(self.cfg.to_dict())})

    @classmethod
    def load(cls, path: str | Path | None = None) -> ShapesCLIP:
        """A file written by `save` (default: the shipped model) -> ShapesCLIP in eval mode."""
        from safetensors import safe_open

        from t2i.checkpoints.io import load_state_dict

        path = Path(path or DEFAULT_PATH)
        if not path.is_file():
            raise FileNotFoundError(f"shapes CLIP weights not found: {path} (train them with `t2i train clip`)")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path}: not a shapes CLIP file (no {METADATA_KEY!r} metadata)")
        model = cls(ShapesCLIPConfig.from_dict(json.loads(raw)))
        model.load_state_dict(load_state_dict(path), strict=True)
        return model.eval()


def contrastive_loss(logits: torch.Tensor, captions: Sequence[str], texts: Sequence[str] | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss): cross-entropy over texts for each image and over images
    for each caption, averaged. logits: (B, M) of B images against M texts, where the first B
    texts are the images' own captions (pair i on the diagonal) and any further M - B texts are
    extra negatives (hard negatives: they enter only the image -> text direction).

    The shapes world repeats captions ("a red circle" of two different scenes): every text equal
    to an image's caption counts as a positive of that image (targets spread evenly over them)
    rather than pushing a true caption away as a negative.
    """
    texts = list(captions) if texts is None else list(texts)
    b = len(captions)
    keys = [" ".join(split_words(c)) for c in texts]
    same = torch.tensor([[keys[i] == k for k in keys] for i in range(b)], dtype=logits.dtype)  # (B, M)
    to_texts = same / same.sum(dim=1, keepdim=True)  # (B, M) rows sum to 1
    to_images = same[:, :b] / same[:, :b].sum(dim=0, keepdim=True)  # (B, B) columns sum to 1
    loss_i = -(to_texts * logits.log_softmax(dim=1)).sum(1).mean()  # image -> all texts
    loss_t = -(to_images * logits[:, :b].log_softmax(dim=0)).sum(0).mean()  # caption -> images
    return (loss_i + loss_t) / 2


# ---------------------------------------------------------------------------- held-out ranking


def heldout_scenes(n: int | None = None, fresh_seed: int | None = None) -> list[tuple[object, str]]:
    """Scenes never trained on, each with a true caption: (Scene, caption) pairs.

    fresh_seed None: the scenes the judge's held-out prompts were drawn from (the same rng
    draws as `t2i.data.shapes.heldout.heldout_draws`), captioned by those prompts, which no
    training caption equals. An int: scenes of that seed (pick one no run trains on) with
    their primary caption.
    """
    from t2i.data.shapes import captions, sample_scene
    from t2i.data.shapes.heldout import heldout_draws

    out: list[tuple[object, str]] = []
    if fresh_seed is not None:
        for i in range(n or 0):
            rng = np.random.default_rng([fresh_seed, i])
            scene = sample_scene(rng)
            out.append((scene, captions(scene, rng)[0]))
        return out
    out = [(scene, prompt) for _family, scene, prompt in heldout_draws()]
    return out[:n] if n is not None else out


def ranking_set(pairs: Sequence[tuple[object, str]], n_candidates: int = 8,
                seed: int = 0) -> tuple[list[Image.Image], list[list[str]]]:
    """For each (scene, caption): its 64x64 render and n_candidates captions, the true one first,
    then distractors drawn from the other scenes' captions that the shapes judge finds FALSE
    for this image (so a distractor is never a caption that happens to be true)."""
    from t2i.data.shapes import render
    from t2i.eval.shapes_judge import judge

    rng = np.random.default_rng(seed)
    pool = [c for _, c in pairs]
    images, candidates = [], []
    for i, (scene, caption) in enumerate(pairs):
        image = render(scene)
        chosen: list[str] = []
        for j in rng.permutation(len(pool)):
            c = pool[j]
            if j != i and c != caption and c not in chosen and not judge(image, c).ok:
                chosen.append(c)
            if len(chosen) == n_candidates - 1:
                break
        images.append(image)
        candidates.append([caption, *chosen])
    return images, candidates


# One-word edits that change what a caption claims (plurals follow their singular).
_SWAPS: dict[str, tuple[str, ...]] = {
    **{c: tuple(o for o in lang.COLOURS if o != c) for c in lang.COLOURS},
    **{s: tuple(o for o in lang.SHAPES if o != s) for s in lang.SHAPES},
    **{p: tuple(o for o in lang.PLURALS.values() if o != p) for p in lang.PLURALS.values()},
    "small": ("large",), "large": ("small",), "above": ("below",), "below": ("above",),
    "left": ("right",), "right": ("left",), "top": ("bottom",), "bottom": ("top",),
    "two": ("three", "four"), "three": ("two", "four"), "four": ("two", "three"),
    "black": ("gray", "white"), "gray": ("black", "white"),
}


def one_word_edits(caption: str) -> list[str]:
    """Every caption that differs from `caption` in one swappable word (colour, shape, size, count,
    side, relation, background), in order of position; some may still be true of the scene."""
    words = caption.split(" ")
    out = [" ".join(words[:i] + [alt + ("," if w.endswith(",") else "")] + words[i + 1:])
           for i, w in enumerate(words) for alt in _SWAPS.get(w.rstrip(","), ())]
    return list(dict.fromkeys(out))


def hard_ranking_set(pairs: Sequence[tuple[object, str]], n_candidates: int = 4,
                     seed: int = 0) -> tuple[list[Image.Image], list[list[str]]]:
    """Like `ranking_set`, but the distractors are the true caption with ONE word changed (a colour,
    shape, size, count, side or relation) and checked FALSE by the judge: the binding, counting
    and spatial distinctions a bag of words cannot make. Scenes with too few such edits are skipped."""
    from t2i.data.shapes import render
    from t2i.eval.shapes_judge import judge

    rng = np.random.default_rng(seed)
    images, candidates = [], []
    for scene, caption in pairs:
        image = render(scene)
        edits = [e for e in one_word_edits(caption) if not judge(image, e).ok]
        if len(edits) < n_candidates - 1:
            continue
        chosen = [edits[j] for j in rng.choice(len(edits), n_candidates - 1, replace=False)]
        images.append(image)
        candidates.append([caption, *chosen])
    return images, candidates


@torch.no_grad()
def ranking_accuracy(embedder, images: Sequence[Image.Image], candidates: Sequence[Sequence[str]]) -> float:
    """Share of images whose first candidate (the true caption) gets the highest cosine similarity."""
    img = F.normalize(embedder.embed_images(list(images)).float(), dim=-1)  # (N, P)
    hits = 0
    for i, cands in enumerate(candidates):
        txt = F.normalize(embedder.embed_texts(list(cands)).float(), dim=-1)  # (K, P)
        hits += int((txt @ img[i]).argmax() == 0)
    return hits / len(candidates)


# ---------------------------------------------------------------------------- shapes FID


def shapes_fid(images1: Sequence[Image.Image], images2: Sequence[Image.Image],
               model: ShapesCLIP | None = None) -> float:
    """Fréchet distance between two image sets in the shapes CLIP's pooled image-feature space
    (vision_width dimensions; use a few hundred images or more per set so the covariances are
    full rank). model None: the shipped shapes CLIP."""
    from t2i.eval.fid import fid_from_features

    model = model or ShapesCLIP.load()
    f1 = model.image_features(list(images1)).double().numpy()  # (N1, D)
    f2 = model.image_features(list(images2)).double().numpy()  # (N2, D)
    return fid_from_features(f1, f2)


def ground_truth_images(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    """n rendered shapes scenes of `seed` (the training distribution; held-out prompts excluded):
    the reference set of shapes FID. Use a seed other than the one the model under test trained on."""
    from t2i.data.shapes import ShapesDataset

    data = ShapesDataset(n, seed=seed, size=size, tensor=False)
    return [Image.fromarray(data[i][0]) for i in range(n)]
