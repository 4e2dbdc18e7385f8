"""`t2i eval fid` and `t2i eval clip-score` on small folders: the numbers equal the library functions'."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_inception import _random_inception

from t2i.cli import main
from t2i.eval import fid, inception
from t2i.eval.inception import extract_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(path, seed: int, n: int = 4, size: int = 40):
    path.mkdir()
    rng = np.random.RandomState(seed)
    images = []
    for i in range(n):
        im = Image.fromarray(rng.randint(0, 256, (size, size + 8, 3)).astype(np.uint8))
        im.save(path / f"{i:03d}.png")
        images.append(im)
    return images


def test_eval_fid_cli_matches_library(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "inception.pth"
    torch.save(_random_inception(1).state_dict(), weights)
    _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1)
    # Record the features the command extracts (their parity is test_inception's business) and
    # check that every number it prints is the library's on those features.
    seen = []

    def recording(*args, **kwargs):
        seen.append(extract_features(*args, **kwargs))
        assert kwargs == {} and args[3] == "clean"  # the default resizing is clean-fid's
        return seen[-1]

    monkeypatch.setattr(inception, "extract_features", recording)
    # sqrtm of a 2048x2048 product takes a minute on a loaded 2-core machine, and the formula is
    # test_fid's business: here, check the command passes the right statistics and prints the result.
    calls = []

    def distance(mu1, sigma1, mu2, sigma2, method="sqrtm"):
        calls.append((mu1, sigma1, mu2, sigma2))
        assert method == "sqrtm"
        return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) - np.trace(sigma2))

    monkeypatch.setattr(fid, "frechet_distance", distance)
    stats = tmp_path / "a.npz"
    code = main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception", str(weights),
                 "--save-stats", str(stats), "--isc", "--kid", "--prc", "--json", str(tmp_path / "out.json")])
    assert code == 0
    out = json.loads((tmp_path / "out.json").read_text())
    (pa, la), (pb, _) = seen
    assert pa.shape == (4, 2048) and la.shape == (4, 1008)
    mu_a, sigma_a = fid.feature_statistics(pa)
    mu_b, sigma_b = fid.feature_statistics(pb)
    for got, want in zip(calls[0], (mu_a, sigma_a, mu_b, sigma_b), strict=True):
        np.testing.assert_array_equal(got, want)
    expected = distance(mu_a, sigma_a, mu_b, sigma_b)
    print(f"FID {out['fid']} (library {expected}); IS {out['inception_score']}; KID {out['kid']}")
    assert out["fid"] == pytest.approx(expected, rel=1e-12) and out["fid"] > 0
    assert out["inception_score"] == pytest.approx(fid.inception_score(la, splits=4)[0], rel=1e-12)
    assert out["kid"] == pytest.approx(fid.kernel_inception_distance(pa, pb)[0], rel=1e-12)
    assert (out["precision"], out["recall"]) == fid.precision_recall(pa, pb)
    # Saved statistics stand in for folders: the same FID from two .npz files, no network needed.
    mu, sigma = fid.load_stats(stats)
    np.testing.assert_array_equal(mu, mu_a)
    fid.save_stats(tmp_path / "b.npz", mu_b, sigma_b)
    assert main(["eval", "fid", str(stats), str(tmp_path / "b.npz"), "--json", str(tmp_path / "out2.json")]) == 0
    assert json.loads((tmp_path / "out2.json").read_text())["fid"] == pytest.approx(expected, rel=1e-12)


def test_eval_fid_cli_without_weights_says_where_they_come_from(tmp_path, capsys) -> None:
    _folder(tmp_path / "a", 0, n=2)
    assert main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--inception PATH" in err and "pt_inception-2015-12-05-6726825d.pth" in err


def test_eval_clip_score_cli_reads_prompts_from_png_parameters(tmp_path) -> None:
    from test_clip_score import build_tiny_clip

    from t2i.eval.clip_score import clip_scores, load_clip

    (tmp_path / "clip").mkdir()
    build_tiny_clip(tmp_path / "clip", seed=2)  # a seed whose scores for these pairs are both > 0
    from PIL.PngImagePlugin import PngInfo

    texts = ["a red circle", "a blue square"]
    images = _folder(tmp_path / "imgs", 3, n=2)
    for i, (im, t) in enumerate(zip(images, texts, strict=True)):
        info = PngInfo()
        info.add_text("parameters", f"{t}\nSteps: 20, Sampler: Euler, Seed: {i}")
        im.save(tmp_path / "imgs" / f"{i:03d}.png", pnginfo=info)
    assert main(["eval", "clip-score", str(tmp_path / "imgs"), "--clip", str(tmp_path / "clip"),
                 "--json", str(tmp_path / "cs.json")]) == 0
    out = json.loads((tmp_path / "cs.json").read_text())
    assert [r["prompt"] for r in out["images"]] == texts
    expected = clip_scores(load_clip(tmp_path / "clip"), images, texts)
    assert [r["clip_score"] for r in out["images"]] == pytest.approx(expected.tolist(), rel=1e-6)
    assert out["clip_score"] == pytest.approx(float(expected.mean()), rel=1e-6)
    assert (expected > 1.0).all()
