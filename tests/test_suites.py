"""Suite readers on small files in the published layouts, run_suite bookkeeping, and `t2i eval suite` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from t2i.eval.suites import (
    SuitePrompt,
    by_category,
    read_drawbench,
    read_partiprompts,
    read_suite,
    run_suite,
    shapes_judge_scorer,
    shapes_suite,
    slug,
)

DRAWBENCH = (
    "Prompts,Category\n"
    "A red colored car.,Colors\n"
    '"A storefront with ""Hello World"" written on it, in gold.",Text\n'
    "A black apple and a green backpack.,Colors\n"
    ",\n"
    "A pear cut into seven pieces arranged in a ring.,Counting\n"
)
PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\t\n"
    'a sign that says "Parti"\tWorld Knowledge\tWriting & Symbols\tthe "quotes" stay\n'
    "a cat, sitting\tAnimals\tBasic\tA note, with commas\n"
    "two dogs\tAnimals\tQuantity\t\n"
)


def test_read_drawbench(tmp_path) -> None:
    path = tmp_path / "drawbench.csv"
    path.write_text(DRAWBENCH, encoding="utf-8")
    prompts = read_drawbench(path)
    assert [p.text for p in prompts] == [
        "A red colored car.", 'A storefront with "Hello World" written on it, in gold.',
        "A black apple and a green backpack.", "A pear cut into seven pieces arranged in a ring."]
    assert [p.category for p in prompts] == ["Colors", "Text", "Colors", "Counting"]
    assert read_suite(path) == prompts
    assert list(by_category(prompts)) == ["Colors", "Text", "Counting"]
    assert [len(g) for g in by_category(prompts, limit=1).values()] == [1, 1, 1]


def test_read_partiprompts(tmp_path) -> None:
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(PARTI, encoding="utf-8")
    prompts = read_partiprompts(path)
    assert prompts[1] == SuitePrompt('a sign that says "Parti"', "World Knowledge", "Writing & Symbols",
                                     'the "quotes" stay')
    assert prompts[2] == SuitePrompt("a cat, sitting", "Animals", "Basic", "A note, with commas")
    assert [p.challenge for p in prompts] == ["Basic", "Writing & Symbols", "Basic", "Quantity"]
    assert read_suite(path) == prompts
    assert slug("World Knowledge") == "world-knowledge" and slug("Food & Beverage") == "food-beverage"


def test_wrong_headers_and_plain_files(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("Text,Category\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a DrawBench CSV.*'Prompts'"):
        read_drawbench(bad)
    with pytest.raises(ValueError, match="not a PartiPrompts TSV"):
        read_partiprompts(bad)
    plain = tmp_path / "plain.txt"
    plain.write_text("# comment\na red circle\n\na blue square\n", encoding="utf-8")
    assert read_suite(plain) == [SuitePrompt("a red circle", "all"), SuitePrompt("a blue square", "all")]


def _solid(value: int) -> Image.Image:
    return Image.fromarray(np.full((16, 16, 3), value, np.uint8))


def test_run_suite_scores_grids_and_sweeps(tmp_path) -> None:
    prompts = [SuitePrompt("p0", "A"), SuitePrompt("p1", "B"), SuitePrompt("p2", "A"), SuitePrompt("p3", "A")]
    calls = []

    def generate(texts, overrides):
        calls.append((list(texts), dict(overrides)))
        g = overrides.get("guidance", 1.0)
        # two images per prompt; brightness 10 k^2 + j + 5 g for prompt k, sample j, guidance g
        return [[_solid(int(10 * int(t[1:]) ** 2 + j + 5 * g)) for j in range(2)] for t in texts]

    def brightness(images, texts):
        return [float(np.asarray(im)[0, 0, 0]) for im in images]

    report = run_suite(generate, prompts, tmp_path, scorers={"b": brightness},
                       set_metrics={"count": lambda ims: float(len(ims))}, sweeps={"guidance": [2.0, 4.0]},
                       limit_per_category=2, model="fake")
    # Category A keeps p0 and p2 (limit 2); at guidance 1: p0 -> 5, 6; p2 -> 45, 46; p1 -> 15, 16.
    assert calls[0] == (["p0", "p2", "p1"], {})
    assert report["categories"]["A"] == {"n": 2, "metrics": {"b": pytest.approx(25.5)}, "grid": "grids/a.png"}
    assert report["categories"]["B"]["metrics"]["b"] == pytest.approx(15.5)
    assert report["metrics"] == {"b": pytest.approx(133 / 6), "count": 6.0}
    # guidance g adds 5 g - 5 to every image.
    assert report["sweeps"]["guidance"]["x"] == [2.0, 4.0]
    assert report["sweeps"]["guidance"]["metrics"] == {"b": [pytest.approx(133 / 6 + 5), pytest.approx(133 / 6 + 15)],
                                                        "count": [6.0, 6.0]}
    grid = Image.open(tmp_path / "grids" / "a.png")
    assert grid.size == (200 + 2 * 132 + 4, 2 * 132 + 4)  # two prompt rows of two 128 px tiles
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["b"] == pytest.approx(133 / 6)
    assert (tmp_path / "report.html").is_file()


def test_run_suite_without_metrics_still_reports(tmp_path) -> None:
    """No scorer applies (no --clip, not shapes prompts): grids and a report that says why."""
    report = run_suite(lambda texts, o: [[_solid(9)] for _ in texts], [SuitePrompt("x", "A")], tmp_path,
                       sweeps={"steps": [1, 2]})
    assert report["metrics"] == {} and report["sweeps"]["steps"] == {"x": [1, 2], "metrics": {}}
    assert "--clip" in report["notes"][0]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "grids" / "a.png").is_file()


def test_shapes_suite_is_the_heldout_set_by_family() -> None:
    from t2i.data.shapes.heldout import FAMILIES, heldout_prompts

    suite = shapes_suite()
    assert [(p.category, p.text) for p in suite] == heldout_prompts()
    assert list(by_category(suite)) == list(FAMILIES)
    assert shapes_judge_scorer([p.text for p in suite]) is not None


def test_shapes_judge_scorer() -> None:
    assert shapes_judge_scorer(["A red colored car."]) is None  # not a shapes-world prompt
    scorer = shapes_judge_scorer(["a red circle"])
    assert scorer is not None
    assert scorer([_solid(0)], ["a red circle"]) == [0.0]  # a black square shows no red circle


def test_eval_suite_cli_end_to_end(tmp_path) -> None:
    """`t2i eval suite` on a tiny random SD folder and a tiny random CLIP: grids, report, sweeps."""
    from sd_oracles import build_sd1
    from test_clip_score import build_tiny_clip

    from t2i.cli import main

    build_sd1(tmp_path / "sd")
    (tmp_path / "clip").mkdir()
    build_tiny_clip(tmp_path / "clip")
    suite = tmp_path / "drawbench.csv"
    suite.write_text(DRAWBENCH, encoding="utf-8")
    out = tmp_path / "out"
    code = main(["eval", "suite", "--prompts", str(suite), "--model", str(tmp_path / "sd"), "--steps", "2",
                 "--limit", "1", "--clip", str(tmp_path / "clip"), "--sweep-guidance", "1,5",
                 "--sweep-steps", "1,2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["categories"]) == ["Colors", "Counting", "Text"]
    assert all((out / c["grid"]).is_file() for c in report["categories"].values())
    assert 0.0 <= report["metrics"]["clip_score"] <= 100.0
    assert "shapes_judge" not in report["metrics"]
    assert report["sweeps"]["steps"]["x"] == [1.0, 2.0]
    # The base run uses 2 steps, as does the steps=2 sweep point: same images, same score.
    assert report["sweeps"]["steps"]["metrics"]["clip_score"][1] == pytest.approx(report["metrics"]["clip_score"])
    assert len(report["sweeps"]["guidance"]["metrics"]["clip_score"]) == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib" in n for n in report["notes"])
    else:
        assert (out / report["sweeps"]["guidance"]["plot"]).is_file()



def test_eval_suite_scores_shapes_prompts_with_the_shipped_shapes_clip(tmp_path) -> None:
    """Shapes prompts and no --clip: the judge and the shipped shapes CLIP's score are both reported."""
    from sd_oracles import build_sd1

    from t2i.cli import main

    build_sd1(tmp_path / "sd")
    suite = tmp_path / "shapes.txt"
    suite.write_text("a red circle\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["eval", "suite", "--prompts", str(suite), "--model", str(tmp_path / "sd"), "--steps", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"shapes_judge", "shapes_clip_score"}
    score = report["metrics"]["shapes_clip_score"]  # max(100 x cosine, 0): a random model draws no red circle
    assert 0.0 <= score < 50.0
