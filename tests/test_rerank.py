"""Sample-and-rank on a tiny random SD folder with a stand-in embedder whose ranking is known:
the kept image is the argmax of the stand-in's similarity among exactly the candidates plain
generation draws from the same seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sd_oracles import build_sd1

import t2i
from t2i.cli import main
from t2i.eval import rerank as rerank_mod
from t2i.eval.rerank import generate_reranked, rank
from t2i.imageio import parse_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(steps=2, guidance=3.0, sampler="euler", width=16, height=16)


class Brightness:
    """Images embed as (1, m - 0.5) with m the mean pixel value in [0, 1]; the prompt 'bright' as
    (1, 1) and any other prompt as (1, -1). cos((1, x), (1, +-1)) is monotonic in x on [-0.5, 0.5]:
    'bright' prefers the brightest candidate, anything else the darkest."""

    def embed_images(self, images):
        m = [np.asarray(im.convert("RGB"), np.float64).mean() / 255 for im in images]
        return torch.tensor([[1.0, v - 0.5] for v in m])

    def embed_texts(self, texts):
        return torch.tensor([[1.0, 1.0 if t == "bright" else -1.0] for t in texts])


def _mean(im: Image.Image) -> float:
    return float(np.asarray(im.convert("RGB"), np.float64).mean() / 255)


def _cos(im: Image.Image, prompt: str) -> float:
    x, s = _mean(im) - 0.5, 1.0 if prompt == "bright" else -1.0
    return (1 + s * x) / (math.sqrt(1 + x * x) * math.sqrt(2))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("rerank") / "tiny-sd1"
    build_sd1(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return t2i.load(str(folder))


def test_rank_picks_the_argmax_and_reports_the_clip_score():
    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (40, 200, 120)]
    r = rank(Brightness(), images, "bright")
    assert r.best == 1
    assert r.cosines == pytest.approx([_cos(im, "bright") for im in images], abs=1e-6)
    assert r.score == pytest.approx(100 * _cos(images[1], "bright"), abs=1e-4)
    assert rank(Brightness(), images, "dark").best == 0


def test_generate_reranked_keeps_the_best_of_k(pipe):
    k, n = 3, 2
    prompts = ["bright", "dark"]
    plain = pipe.generate(prompts, seed=[7, 40], num_images=n * k, **SETTINGS)
    kept = generate_reranked(pipe, prompts, k, Brightness(), seed=[7, 40], num_images=n, **SETTINGS)
    assert len(kept.images) == len(prompts) * n and kept.latents.shape[0] == len(prompts) * n
    for g in range(len(prompts) * n):
        prompt = prompts[g // n]
        candidates = plain.images[g * k: (g + 1) * k]
        cos = [_cos(im, prompt) for im in candidates]
        best = int(np.argmax(cos))
        assert max(cos) - min(cos) > 1e-4, "candidates indistinguishable: the test would prove nothing"
        assert kept.seeds[g] == plain.seeds[g * k + best] == [7, 40][g // n] + (g % n) * k + best
        assert np.array_equal(np.asarray(kept.images[g]), np.asarray(candidates[best]))
        torch.testing.assert_close(kept.latents[g], plain.latents[g * k + best], rtol=0, atol=0)
        params = parse_parameters(kept.images[g].info["parameters"])
        assert params["Rerank"] == str(k)
        assert float(params["CLIP score"]) == pytest.approx(100 * max(cos), abs=0.006)
        assert params["Seed"] == str(kept.seeds[g])


def test_rerank_one_is_plain_generation(pipe):
    plain = pipe.generate("bright", seed=3, **SETTINGS)
    same = generate_reranked(pipe, "bright", 1, Brightness(), seed=3, **SETTINGS)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(same.images[0]))
    assert "Rerank" not in same.images[0].info["parameters"]


def test_cli_rerank_writes_the_argmax_with_its_score(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(rerank_mod, "load_embedder", lambda path: Brightness())
    args = ["generate", "dark", "--model", str(folder), "--steps", "2", "--guidance", "3", "--sampler", "euler",
            "--width", "16", "--height", "16", "--seed", "11", "--quiet"]
    assert main([*args, "--num-images", "4", "--out", str(tmp_path / "all.png")]) == 0
    assert main([*args, "--rerank", "4", "--out", str(tmp_path / "best.png"),
                 "--save-latents", str(tmp_path / "best.safetensors")]) == 0
    candidates = [Image.open(tmp_path / f"all-{j}.png") for j in range(4)]
    cos = [_cos(im, "dark") for im in candidates]
    best = int(np.argmax(cos))
    kept = Image.open(tmp_path / "best.png")
    assert np.array_equal(np.asarray(kept), np.asarray(candidates[best]))
    params = parse_parameters(kept.info["parameters"])
    assert (params["Rerank"], params["Seed"]) == ("4", str(11 + best))
    assert float(params["CLIP score"]) == pytest.approx(100 * max(cos), abs=0.006)
    assert load_file(tmp_path / "best.safetensors")["latents"].shape[0] == 1


def test_cli_rejects_rerank_zero(folder, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(folder), "--rerank", "0", "--out", str(tmp_path / "x.png")])
    assert code != 0
    assert "--rerank must be at least 1" in capsys.readouterr().err


def test_judge_rerank_gain_with_the_shipped_clip():
    """A stand-in pipeline whose candidate 0 shows another scene and candidate 2 the prompt's own:
    rerank 1 keeps candidate 0, rerank 4 with the shipped shapes CLIP should find the true one."""
    from types import SimpleNamespace

    from t2i.data.shapes import render
    from t2i.eval.rerank import judge_rerank_gain
    from t2i.eval.shapes_clip import heldout_scenes

    pairs = heldout_scenes()[::12]  # 25 scenes over all families
    n = len(pairs)
    by_prompt = {c: [render(pairs[(i + d) % n][0]) for d in (1, 2, 0, 3)] for i, (_, c) in enumerate(pairs)}

    class Candidates:
        def generate(self, prompt, seed=0, num_images=1, **settings):
            return SimpleNamespace(images=by_prompt[prompt][:num_images])

    out = judge_rerank_gain(Candidates(), list(by_prompt), 4)
    assert out["n"] == n and out["k"] == 4
    assert [r["candidates_ok"][2] for r in out["per_prompt"]] == [True] * n  # the true scene passes the judge
    assert out["rerank_1"] == sum(r["candidates_ok"][0] for r in out["per_prompt"]) / n
    assert out["rerank_1"] < 0.2
    assert out["rerank_k"] >= 0.7  # same-family neighbours: harder than ranking captions (0.84 at step 300)


def test_eval_shapes_rerank_reports_both_sides_per_family(tmp_path, monkeypatch, capsys):
    """`t2i eval shapes --rerank 4` on a stand-in model whose third candidate is the prompt's own
    scene: rerank 1 (candidate 0, another scene) fails, rerank 4 keeps the true scene; rerank.json
    holds the same numbers per family as stdout; rerank 2, the best of the first two draws, is reported
    from the same draws (and fails: both show other scenes); --precision reaches the loader and the report."""
    import json
    from types import SimpleNamespace

    import t2i
    from t2i.cli import main
    from t2i.data.shapes import render
    from t2i.data.shapes.heldout import heldout_draws
    from t2i.systems.base import Capabilities

    draws = heldout_draws(per_family=2)
    scene_of = {p: s for _f, s, p in draws}
    others = {p: render(draws[(i + 5) % len(draws)][1]) for i, (_f, _s, p) in enumerate(draws)}

    class Candidates:
        name, family = "stand-in", "test"  # a Pipeline as far as eval checks requests
        capabilities = Capabilities(options=frozenset({"steps", "guidance", "sampler", "deepcache", "preview"}))

        def generate(self, prompt, seed=0, num_images=1, **settings):
            assert num_images == 4 and seed == 0
            return SimpleNamespace(images=[others[prompt], others[prompt], render(scene_of[prompt]), others[prompt]])

    asked = []
    monkeypatch.setattr(t2i, "load", lambda model=None, precision="fp32": asked.append(precision) or Candidates())
    code = main(["eval", "shapes", "--limit", "2", "--rerank", "4", "--precision", "fp32", "--out", str(tmp_path)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert asked == ["fp32"] and printed["precision"] == "fp32"
    saved = json.loads((tmp_path / "rerank.json").read_text())
    assert printed["n"] == 12 and saved["rerank_4"] == printed["rerank_4"]
    assert set(printed["rerank_4"]) == {"overall", "single", "region", "binding", "relation", "counting", "background"}
    assert printed["rerank_1"]["overall"] < 0.5
    assert printed["rerank_2"]["overall"] < 0.5  # the first two candidates: other scenes only
    assert printed["rerank_4"]["overall"] >= 0.9
    assert set(printed["unseen_phrasing"]) == {"rerank_1", "rerank_2", "rerank_4"}
    assert [r["kept"] for r in saved["per_prompt"]].count(2) >= 11
