"""The shapes CLIP: vocabulary and tokenizer, the InfoNCE loss by hand, save/load, the shipped
model's held-out ranking accuracy (issue 6: true caption first of 8 at least 90% of the time),
shapes FID, and an exactly resumable `t2i train clip`."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from t2i.cli import main
from t2i.data.shapes import render, shapes_example
from t2i.eval.clip_score import ImageTextEmbedder, clip_scores
from t2i.eval.shapes_clip import (
    BOS,
    DEFAULT_PATH,
    EOS,
    METADATA_KEY,
    PAD,
    UNK,
    ShapesCLIP,
    ShapesCLIPConfig,
    contrastive_loss,
    ground_truth_images,
    heldout_scenes,
    one_word_edits,
    ranking_accuracy,
    ranking_set,
    shapes_fid,
    shapes_vocabulary,
)
from t2i.eval.shapes_judge import judge
from t2i.train.checkpoint import checkpoint_path, load_state_dict
from t2i.train.clip import CLIPTrainConfig, cosine_lr, hard_negatives, train_clip

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ShapesCLIPConfig(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                        text_heads=2, embed_dim=16)


@pytest.fixture(scope="module")
def shipped() -> ShapesCLIP:
    return ShapesCLIP.load()


@pytest.fixture(scope="module")
def heldout_set() -> tuple[list[Image.Image], list[list[str]]]:
    """The judge's 300 held-out scenes (captions no training caption equals), 7 false distractors each."""
    return ranking_set(heldout_scenes())


def test_vocabulary_covers_the_caption_language():
    vocab = set(shapes_vocabulary())
    assert 55 <= len(vocab) <= 80
    for i in range(1500):
        _, caption = shapes_example(0, i)
        words = caption.replace(",", " , ").split()
        assert set(words) <= vocab, (caption, set(words) - vocab)


def test_tokenizer_layout():
    model = ShapesCLIP(TINY)
    vocab = list(TINY.vocab)
    ids = model.tokenizer.encode(["A red circle, a blue square.", "red zebra"])
    expected0 = [BOS] + [vocab.index(w) for w in ["a", "red", "circle", ",", "a", "blue", "square"]] + [EOS]
    assert ids[0].tolist() == expected0
    assert ids[1].tolist() == [BOS, vocab.index("red"), UNK, EOS] + [PAD] * 5
    long = model.tokenizer.encode(["red " * 100])
    assert long.shape == (1, TINY.max_tokens) and long[0, -1] == EOS


def test_contrastive_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(4, 4) * 3
    unique = ["a red circle", "a blue square", "two green crosses", "a pink diamond"]
    ce = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    assert contrastive_loss(logits, unique).item() == pytest.approx(ce.item(), abs=1e-6)
    # Captions 0 and 2 are the same text: each of their rows/columns has two positives of weight 1/2.
    dup = ["a red circle", "a blue square", "A red circle", "a pink diamond"]
    lp_row, lp_col = logits.log_softmax(1), logits.log_softmax(0)
    pos = {0: [0, 2], 1: [1], 2: [0, 2], 3: [3]}
    by_hand = 0.0
    for i, js in pos.items():
        by_hand -= sum(lp_row[i, j] for j in js) / len(js) / 4 / 2
        by_hand -= sum(lp_col[j, i] for j in js) / len(js) / 4 / 2
    assert contrastive_loss(logits, dup).item() == pytest.approx(float(by_hand), abs=1e-6)


def test_contrastive_loss_with_hard_negatives_by_hand():
    torch.manual_seed(1)
    captions = ["a red circle", "a blue square", "a pink diamond"]
    texts = captions + ["a green circle", "a pink diamond"]  # the last one equals caption 2: a positive
    logits = torch.randn(3, 5) * 3
    lp_row, lp_col = logits.log_softmax(1), logits[:, :3].log_softmax(0)
    img = -(lp_row[0, 0] + lp_row[1, 1] + (lp_row[2, 2] + lp_row[2, 4]) / 2) / 3
    txt = -(lp_col[0, 0] + lp_col[1, 1] + lp_col[2, 2]) / 3
    assert contrastive_loss(logits, captions, texts).item() == pytest.approx(float(img + txt) / 2, abs=1e-6)


def test_hard_negatives_are_one_word_edits_the_judge_rejects():
    pairs = [shapes_example(5, i) for i in range(40)]
    scenes, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    negs = hard_negatives(scenes, captions, seed=5, position=0)
    assert negs == hard_negatives(scenes, captions, seed=5, position=0)  # a resumed run draws the same
    assert negs != hard_negatives(scenes, captions, seed=5, position=64)
    assert len(negs) >= 38
    by_caption = {c: s for s, c in pairs}
    for neg in negs:
        caption = next(c for c in captions if neg in one_word_edits(c))
        assert sum(a != b for a, b in zip(neg.split(), caption.split(), strict=True)) == 1
        assert not judge(render(by_caption[caption]), neg).ok  # false on the pixels too
        assert judge(render(by_caption[caption]), caption).ok


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = ShapesCLIP(TINY).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.save(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        assert METADATA_KEY in f.metadata()
    loaded = ShapesCLIP.load(tmp_path / "c.safetensors")
    assert loaded.cfg == TINY and loaded.logit_scale.item() == 3.0
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (128, 128), (30, 30, 200))]
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(loaded.embed_images(images), model.embed_images(images), rtol=0, atol=0)
    torch.testing.assert_close(loaded.embed_texts(texts), model.embed_texts(texts), rtol=0, atol=0)
    assert isinstance(loaded, ImageTextEmbedder)
    with pytest.raises(FileNotFoundError, match="t2i train clip"):
        ShapesCLIP.load(tmp_path / "missing.safetensors")


def test_shipped_model_is_small(shipped):
    import os

    assert os.path.getsize(DEFAULT_PATH) < 10e6
    assert sum(p.numel() for p in shipped.parameters()) < 2.5e6


def test_ranking_set_distractors_are_false(heldout_set):
    images, candidates = heldout_set
    assert len(images) == 300
    for image, cands in zip(images[::6], candidates[::6], strict=True):
        assert len(cands) == 8 and len(set(cands)) == 8
        assert judge(image, cands[0]).ok
        assert not any(judge(image, c).ok for c in cands[1:])


def test_shipped_model_ranks_heldout_captions_first(shipped, heldout_set):
    images, candidates = heldout_set
    acc = ranking_accuracy(shipped, images, candidates)
    print(f"held-out ranking accuracy (judge's held-out scenes): {acc:.3f}")
    assert acc >= 0.9
    # A model that ignores the image would sit near 1/8.
    assert ranking_accuracy(ShapesCLIP(shipped.cfg).eval(), images, candidates) < 0.35


def test_shipped_model_ranks_fresh_scenes_first(shipped):
    """Scenes of a seed no training run used, with their primary captions."""
    images, candidates = ranking_set(heldout_scenes(150, fresh_seed=987_654_321), seed=1)
    acc = ranking_accuracy(shipped, images, candidates)
    print(f"held-out ranking accuracy (fresh seed): {acc:.3f}")
    assert acc >= 0.9


def test_shipped_model_clip_scores_prefer_true_captions(shipped, heldout_set):
    images, candidates = heldout_set
    true = clip_scores(shipped, images, [c[0] for c in candidates])
    false = clip_scores(shipped, images, [c[1] for c in candidates])
    assert float(true.mean()) > float(false.mean()) + 10


def test_shapes_fid_ground_truth_vs_noise(shipped):
    gt_a, gt_b = ground_truth_images(400, seed=101), ground_truth_images(400, seed=202)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(400)]
    same = shapes_fid(gt_a, gt_a, shipped)
    gt = shapes_fid(gt_a, gt_b, shipped)
    to_noise = shapes_fid(gt_a, noise, shipped)
    print(f"shapes FID: same set {same:.3g}, ground truth seeds 101 vs 202 {gt:.4g}, ground truth vs noise "
          f"{to_noise:.4g}")
    assert abs(same) < 1e-6
    assert to_noise > 50 * gt


def test_cosine_lr():
    cfg = CLIPTrainConfig(out="x", steps=110, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert cosine_lr(0, cfg) == pytest.approx(1e-4)
    assert cosine_lr(10, cfg) == pytest.approx(1e-3)
    assert cosine_lr(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert cosine_lr(110, cfg) == pytest.approx(1e-4)
    assert cosine_lr(35, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))


def test_train_clip_resumes_exactly(tmp_path):
    """A run killed after its step-2 checkpoint and resumed ends with the same weights as one that never stopped."""
    kw = dict(model=TINY, steps=4, batch_size=8, warmup=2, eval_every=0, eval_scenes=8, ckpt_every=2, keep=3,
              log_every=1)
    assert train_clip(CLIPTrainConfig(out=str(tmp_path / "a"), **kw)) == 0
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_path(tmp_path / "a", 2), checkpoint_path(tmp_path / "b", 2))
    assert train_clip(CLIPTrainConfig(out=str(tmp_path / "b"), **kw), resume=True) == 0
    a = load_state_dict(checkpoint_path(tmp_path / "a", 4))
    b = load_state_dict(checkpoint_path(tmp_path / "b", 4))
    first = load_state_dict(checkpoint_path(tmp_path / "a", 2))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], first[k]) for k in a if k.startswith("model."))  # it did train
    exported = ShapesCLIP.load(tmp_path / "b" / "shapes_clip.safetensors")
    torch.testing.assert_close(exported.logit_scale.detach(), a["model.logit_scale"], rtol=0, atol=0)


def test_cli_train_clip(tmp_path):
    args = ["train", "clip", "--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--width", "32",
            "--vision-layers", "1", "--text-layers", "1", "--eval-scenes", "8", "--eval-every", "0"]
    assert main(args) == 0
    model = ShapesCLIP.load(tmp_path / "shapes_clip.safetensors")
    assert (model.cfg.vision_width, model.cfg.vision_layers, model.cfg.text_layers) == (32, 1, 1)
    assert (tmp_path / "metrics.jsonl").read_text().count("heldout_rank1_of_8") == 1


def test_cli_shapes_fid_equals_the_library(shipped, tmp_path):
    import json

    gt = ground_truth_images(200, seed=7)
    rng = np.random.default_rng(1)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(200)]
    for name, images in (("gt", gt), ("noise", noise)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            im.save(tmp_path / name / f"{i:04d}.png")
    assert main(["eval", "shapes-fid", str(tmp_path / "gt"), "--ref-seed", "8",
                 "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert (a["ref_seed"], a["ref_count"]) == (8, 200)
    assert a["shapes_fid"] == pytest.approx(shapes_fid(gt, ground_truth_images(200, seed=8), shipped), rel=1e-9)
    assert main(["eval", "shapes-fid", str(tmp_path / "gt"), str(tmp_path / "noise"),
                 "--json", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["shapes_fid"] == pytest.approx(shapes_fid(gt, noise, shipped), rel=1e-9)
    assert b["shapes_fid"] > 20 * a["shapes_fid"]
