"""The HTML report shows exactly the JSON's numbers; plots are drawn, or the missing-matplotlib hint is given."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser

import pytest

from t2i.eval.report import MATPLOTLIB_HINT, format_number, require_matplotlib, write_report


def _report() -> dict:
    return {
        "title": "demo", "model": "tiny", "settings": {"steps": 20, "sampler": "euler"},
        "metrics": {"clip_score": 27.123456789, "shapes_judge": 0.625, "fid": 123.456789},
        "categories": {
            "Food & Beverage": {"n": 3, "metrics": {"clip_score": 25.0000001, "shapes_judge": 1 / 3},
                                "grid": "grids/food-beverage.png"},
            "Animals": {"n": 5, "metrics": {"clip_score": 29.87654321}, "grid": "grids/animals.png"},
        },
        "sweeps": {
            "guidance": {"x": [1.0, 3.0, 7.5], "metrics": {"clip_score": [22.5, 26.25, 28.125],
                                                          "fid": [40.0, 31.5, 35.25]}},
            "steps": {"x": [5, 10, 20], "metrics": {"clip_score": [20.1, 24.2, 27.3]}},
        },
        "notes": [],
    }


class _Numbers(HTMLParser):
    """Collects (data-key path, displayed text) of every number cell."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[list, str]] = []
        self._key: list | None = None

    def handle_starttag(self, tag, attrs):
        key = dict(attrs).get("data-key")
        self._key = json.loads(key) if key else None

    def handle_data(self, data):
        if self._key is not None:
            self.cells.append((self._key, data))
            self._key = None


def _lookup(d, path):
    for p in path:
        d = d[p]
    return d


def _numbers_in_json(d, path=()) -> set[tuple]:
    """Paths of every number in the report's metric sections."""
    if isinstance(d, dict):
        return set().union(*(_numbers_in_json(v, (*path, k)) for k, v in d.items())) if d else set()
    if isinstance(d, list):
        return set().union(*(_numbers_in_json(v, (*path, i)) for i, v in enumerate(d))) if d else set()
    return {path} if isinstance(d, (int, float)) and not isinstance(d, bool) else set()


def test_html_numbers_equal_the_json(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    json_path, html_path = write_report(_report(), tmp_path)
    saved = json.loads(json_path.read_text())
    parser = _Numbers()
    parser.feed(html_path.read_text())
    assert len(parser.cells) > 20
    for path, shown in parser.cells:
        value = _lookup(saved, path)
        assert shown == format_number(value)
        assert float(shown) == pytest.approx(value, rel=5e-6)
    # Every number of metrics, categories and sweeps appears on the page.
    wanted = {p for section in ("metrics", "categories", "sweeps") for p in _numbers_in_json(saved[section],
                                                                                              (section,))}
    assert wanted == {tuple(p) for p, _ in parser.cells}
    assert "27.1235" in html_path.read_text()
    # The plots exist and are referenced from both the JSON and the page.
    for name in ("guidance", "steps"):
        rel = saved["sweeps"][name]["plot"]
        assert rel == f"plots/{name}.png" and (tmp_path / rel).stat().st_size > 1000
        assert f"src='{rel}'" in html_path.read_text()


def test_tradeoff_panel_when_fid_and_clip_score_are_swept(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    write_report(_report(), tmp_path)
    w_guidance = Image.open(tmp_path / "plots" / "guidance.png").size[0]
    w_steps = Image.open(tmp_path / "plots" / "steps.png").size[0]
    assert w_guidance == 3 * w_steps  # clip_score, fid and the FID-vs-CLIP panel; steps has one panel


def test_missing_matplotlib_gives_the_hint(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        require_matplotlib()
    json_path, html_path = write_report(_report(), tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["notes"] == [MATPLOTLIB_HINT]
    assert "plot" not in saved["sweeps"]["guidance"]
    assert MATPLOTLIB_HINT in html_path.read_text()
    assert saved["metrics"]["fid"] == 123.456789


def test_report_without_sweeps_needs_no_matplotlib(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = {**_report(), "sweeps": {}}
    json_path, _ = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["notes"] == []
    assert format_number(3) == "3" and format_number(0.1234567) == "0.123457" and format_number(float("nan")) == "n/a"
