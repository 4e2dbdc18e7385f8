"""`t2i eval shapes --layouts truth` (issue 17): each held-out prompt drawn from its scene's true
layout, models without layouts refused by name; the judge's report on the prompts written with
the phrasings held out of the layout model's training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from t2i.cli import main
from t2i.data.shapes import render
from t2i.data.shapes.heldout import heldout_draws, heldout_prompts
from t2i.data.shapes.layouts import scene_layout
from t2i.data.shapes.phrasings import uses_heldout_phrasing
from t2i.eval.shapes_judge import run_shapes_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes():
    """held-out prompt -> (family, the scene it is the primary caption of)."""
    return {prompt: (family, scene) for family, scene, prompt in heldout_draws()}


def test_unseen_phrasing_is_the_held_out_phrasings_subset(scenes):
    """The subset holds exactly the held-out prompts with a held-out phrasing (40 of 300), and its
    accuracy is read on them alone: true scenes for them, blank images for the rest."""
    pairs = heldout_prompts()
    unseen = [p for _, p in pairs if uses_heldout_phrasing(p)]
    assert len(unseen) == 40

    def generate(batch):
        return [render(scenes[p][1]) if uses_heldout_phrasing(p) else np.full((64, 64, 3), 255, np.uint8)
                for p in batch]

    report = run_shapes_eval(generate, pairs, batch_size=50)
    sub = report["unseen_phrasing"]
    assert sub["n"] == len(unseen) and sub["accuracy"] == 1.0
    assert sum(sub["count"].values()) == len(unseen) and set(sub["by_family"].values()) == {1.0}
    assert sub["count"] == {f: sum(scenes[p][0] == f for p in unseen) for f in sub["count"]}
    assert report["n"] == 300 and report["overall"] == pytest.approx(len(unseen) / 300)


def _recorded_runs(monkeypatch, cls) -> list:
    """The requests cls.run receives from here on (it still runs them)."""
    requests, run = [], cls.run

    def recording(self, request):
        requests.append(request)
        return run(self, request)

    monkeypatch.setattr(cls, "run", recording)
    return requests


def test_layouts_truth_draws_each_prompt_from_its_scenes_layout(tmp_path, monkeypatch, capsys, scenes):
    from t2i.systems import registry
    from t2i.systems.shapes_layout import ShapesLayoutPipeline, write_tiny_model

    if "t2i.systems.shapes_layout" not in registry.FAMILY_MODULES:  # until the family is registered
        monkeypatch.setattr(registry, "FAMILY_MODULES", ("t2i.systems.shapes_layout", *registry.FAMILY_MODULES))
    write_tiny_model(tmp_path / "layout-tiny")
    requests = _recorded_runs(monkeypatch, ShapesLayoutPipeline)
    out = tmp_path / "eval"
    assert main(["eval", "shapes", "--model", str(tmp_path / "layout-tiny"), "--layouts", "truth", "--limit", "1",
                 "--steps", "1", "--precision", "fp32", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "results.json").read_text())
    prompts = [r["prompt"] for r in report["results"]]
    assert report["n"] == 6 and len(set(report["count"])) == 6  # one prompt of each family
    # one request per prompt, in order, each holding the true layout of that prompt's own scene
    assert [r.prompt for r in requests] == prompts
    assert [r.layout for r in requests] == [scene_layout(scenes[p][1]) for p in prompts]
    assert len({r.layout for r in requests}) == 6 and all(r.seed == 0 and r.steps == 1 for r in requests)
    assert printed["layouts"] == "truth" and printed["family"] == "shapes_layout"
    assert printed["unseen_phrasing"]["n"] == sum(map(uses_heldout_phrasing, prompts))
    assert report["unseen_phrasing"] == printed["unseen_phrasing"]


def test_layouts_truth_refuses_a_model_without_layouts_by_name(tmp_path, monkeypatch, capsys):
    from t2i.systems.latent_diffusion import LatentDiffusionPipeline
    from t2i.systems.shapes_ldm import write_tiny_model

    write_tiny_model(tmp_path / "plain-tiny")
    requests = _recorded_runs(monkeypatch, LatentDiffusionPipeline)
    assert main(["eval", "shapes", "--model", str(tmp_path / "plain-tiny"), "--layouts", "truth", "--limit", "1",
                 "--steps", "1", "--precision", "fp32", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "plain-tiny" in err and "'layout'" in err
    assert requests == [] and not (tmp_path / "eval").exists()  # refused before any image


def test_layouts_truth_refuses_prompts_without_a_scene(tmp_path, monkeypatch, capsys):
    import t2i

    held = heldout_prompts()[7][1]
    (tmp_path / "prompts.txt").write_text(f"single\t{held}\nrelation\ta red circle far away from a blue square\n")
    monkeypatch.setattr(t2i, "load", lambda *a, **k: pytest.fail("the model loaded before the prompts were checked"))
    assert main(["eval", "shapes", "--prompts", str(tmp_path / "prompts.txt"), "--layouts", "truth",
                 "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "held-out" in err and "'a red circle far away from a blue square'" in err and held not in err
