"""CLIP score with our towers vs a hand computation with transformers' CLIPModel (random tiny weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.eval.clip_score import (
    CLIP,
    CLIPImagePreprocess,
    ImageTextEmbedder,
    clip_score,
    clip_scores,
    load_clip,
)
from t2i.text.clip_tokenizer import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a red circle", "two blue squares on a white background", "a cat", "a green triangle above a star"]


def build_tiny_clip(folder, seed: int = 0):
    """A tiny random transformers CLIPModel saved as a folder, with the real CLIP tokenizer and a
    preprocessor config (48 px, non-default mean/std). Returns the transformers model."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                           image_size=48, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # spread the embeddings: random init leaves cosines near 0
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    CLIPTokenizer.default().save(folder)
    pre = {"size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}, "do_resize": True,
           "do_center_crop": True, "resample": 3, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, build_tiny_clip(folder)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.RandomState(7)
    sizes = [(64, 48), (48, 80), (50, 50), (97, 61)]
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)) for w, h in sizes[:n]]


def test_clip_score_matches_transformers_by_hand(clip_folder) -> None:
    folder, ref = clip_folder
    ours = load_clip(folder)
    assert isinstance(ours, ImageTextEmbedder)
    images = _images(4)
    # Every image with every text: 16 pairs, so both sides of the clamp at 0 occur.
    pair_images = [im for im in images for _ in TEXTS]
    pair_texts = TEXTS * len(images)
    pixels = ours.preprocess(pair_images)  # (16, 3, 48, 48)
    ids = ours.tokenizer.tokenize(pair_texts).ids  # (16, 77)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # transformers normalizes both embeddings
    expected = 100 * cos.clamp(min=0)
    got = clip_scores(ours, pair_images, pair_texts)
    print(f"cos {[round(c, 4) for c in cos.tolist()]}\nours {[round(g, 3) for g in got.tolist()]}")
    assert (cos < 0).sum() >= 2 and (cos > 0.01).sum() >= 3  # the clamp matters and scores are not all 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert clip_score(ours, pair_images, pair_texts) == pytest.approx(float(expected.mean()), rel=1e-5)
    # The embeddings themselves equal transformers' (up to its normalization).
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(norm(ours.embed_texts(TEXTS), dim=-1), out.text_embeds[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(ours.embed_images(images), dim=-1), out.image_embeds[::4], rtol=1e-5, atol=1e-5)
    # Batching does not change embeddings (4 images in batches of 3, 16 texts in batches of 5).
    torch.testing.assert_close(ours.embed_images(images, batch_size=3), ours.embed_images(images))
    torch.testing.assert_close(ours.embed_texts(pair_texts, batch_size=5), ours.embed_texts(pair_texts))
    assert ours.logit_scale == pytest.approx(float(ref.logit_scale.detach().exp()), rel=1e-6)


def test_preprocessing_matches_transformers_image_processor(clip_folder) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder, _ = clip_folder
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    proc = CLIPImageProcessorPil(**cfg)
    images = _images(4)
    ref = torch.as_tensor(np.stack(proc(images=images, return_tensors="np")["pixel_values"]))
    ours = CLIPImagePreprocess.from_config(cfg, 48)(images)
    assert ours.shape == (4, 3, 48, 48)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)


class _Fixed:
    """A toy embedder: the protocol is all clip_score needs (how a shapes CLIP plugs in)."""

    def embed_images(self, images):
        return torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])

    def embed_texts(self, texts):
        return torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])


def test_clip_score_formula_on_a_toy_embedder() -> None:
    scores = clip_scores(_Fixed(), [None] * 3, ["a", "b", "c"])
    torch.testing.assert_close(scores, torch.tensor([100.0, 100 / 2**0.5, 0.0]))
    assert clip_score(_Fixed(), [None] * 3, ["a", "b", "c"]) == pytest.approx((100 + 100 / 2**0.5) / 3)
    with pytest.raises(ValueError, match="scores pairs"):
        clip_scores(_Fixed(), [None] * 3, ["a"])


def test_load_clip_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {}}))
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        load_clip(tmp_path)
    assert CLIP.__doc__
