"""`t2i generate --layout FILE.json` (issue 17): the layout is read on the image's size and reaches
the model, the PNG records it, a bad file or layout is one line naming the object (exit 2) before
any work, and a model without layouts refuses the option by name."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from test_cli_generate import NoEta
from test_layout_spec import LayoutFake

import t2i
from t2i.cli import main
from t2i.imageio import parse_parameters, request_fields
from t2i.layout.spec import Layout, LayoutObject

TWO = {"objects": [{"phrase": "a red circle", "box": [8, 0, 24, 16]},
                   {"phrase": "a blue square", "box": [0, 16, 32, 32]}]}
AT_32 = Layout((LayoutObject("a red circle", (0.25, 0.0, 0.75, 0.5)),  # TWO on the fake's 32x32
                LayoutObject("a blue square", (0.0, 0.5, 1.0, 1.0))))


@pytest.fixture
def fake(monkeypatch):
    pipe = LayoutFake()
    monkeypatch.setattr(t2i, "load", lambda model=None, **k: pipe)
    return pipe


def write(tmp_path, data, name="layout.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_layout_file_reaches_the_model_in_pixels_of_the_image(fake, tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle above a blue square", "--layout", write(tmp_path, TWO), "--seed", "1",
                 "--out", str(out), "--quiet"]) == 0
    # No --width/--height: pixels are read on the model's 32x32.
    assert fake.requests[-1].layout == AT_32
    fields = request_fields(parse_parameters(Image.open(out).info["parameters"]))
    assert fields["layout"] == AT_32 and fields["width"] == 32
    # At 64x64 the same pixels are a quarter of the canvas.
    assert main(["generate", "x", "--layout", write(tmp_path, TWO), "--width", "64", "--height", "64", "--seed", "1",
                 "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    assert fake.requests[-1].layout.objects[1].box == (0.0, 0.25, 0.5, 0.5)


def test_layout_from_stdin(fake, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(TWO)))
    assert main(["generate", "x", "--layout", "-", "--out", str(tmp_path / "a.png"), "--seed", "0", "--quiet"]) == 0
    assert [o.phrase for o in fake.requests[-1].layout.objects] == ["a red circle", "a blue square"]


BAD = [
    ({"objects": [{"phrase": "a red circle", "box": [0, 0, 8, 8]},
                  {"phrase": "a blue square", "box": [0, 16, 48, 32]}]},
     "layout object 2 ('a blue square')", "outside the canvas"),
    ([{"phrase": "", "box": [0, 0, 8, 8]}], "layout object 1", "empty phrase"),
    ([{"phrase": f"shape {i}", "box": [0, 0, 8, 8]} for i in range(4)], "4 objects", "at most 3"),
    ("{not json", "is not valid JSON", "line 1"),
]


@pytest.mark.parametrize("data,names,problem", BAD)
def test_bad_layouts_are_one_line_naming_the_object_before_any_work(fake, tmp_path, capsys, data, names, problem):
    path = write(tmp_path, data)
    assert main(["generate", "x", "--layout", path, "--out", str(tmp_path / "a.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--layout {path}" in err[0] and names in err[0] and problem in err[0], err
    assert fake.requests == [] and not (tmp_path / "a.png").exists()


def test_missing_layout_file(fake, tmp_path, capsys):
    assert main(["generate", "x", "--layout", str(tmp_path / "nowhere.json"), "--quiet"]) == 2
    assert "--layout file not found" in capsys.readouterr().err and fake.requests == []


def test_a_model_without_layouts_refuses_the_option_by_name(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(t2i, "load", lambda model=None, **k: NoEta())  # its run() fails the test if called
    assert main(["generate", "x", "--layout", write(tmp_path, TWO), "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'layout'" in err[0] and "no-eta-model" in err[0]


def test_prompts_file_resumes_with_planned_and_given_layouts(fake, tmp_path, capsys):
    """A planned layout is known only after the run: a rerun must still see its outputs as done."""
    lines = tmp_path / "p.txt"
    lines.write_text("a red circle\na blue square\n")
    for layout in ([], ["--layout", write(tmp_path, TWO)]):
        out = tmp_path / ("given" if layout else "planned")
        args = ["generate", "--prompts-file", str(lines), "--out-dir", str(out), "--seed", "2", "--quiet", *layout]
        assert main(args) == 0
        runs = len(fake.requests)
        assert main(args) == 0
        assert len(fake.requests) == runs and "2 prompt(s) already done" in capsys.readouterr().err
        params = parse_parameters(Image.open(out / "0001.png").info["parameters"])
        assert json.loads(params["Layout"])["objects"][0]["phrase"] == ("a red circle" if layout else "a blue square")


def test_the_layout_model_records_the_given_layout_and_regenerates_from_it(monkeypatch, tmp_path):
    """The real renderer (tiny, random): the PNG's Layout gives the same image back."""
    from t2i.systems.shapes_layout import load_layout_model, write_tiny_model

    model = write_tiny_model(tmp_path / "tiny")  # 16x16 images
    monkeypatch.setattr(t2i, "load", lambda model=None, **k: load_layout_model(model))
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(model), "--layout",
                 write(tmp_path, [{"phrase": "a red circle", "box": [4, 0, 12, 8]}]),
                 "--steps", "2", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    fields = request_fields(parse_parameters(Image.open(out).info["parameters"]))
    assert fields["layout"] == Layout(AT_32.objects[:1])  # 4..12 px of 16: the same fractions as TWO on 32
    pipe = load_layout_model(model)
    again = pipe.generate(**{k: v for k, v in fields.items() if k not in ("model", "precision")}).images[0]
    assert again.tobytes() == Image.open(out).convert("RGB").tobytes()
