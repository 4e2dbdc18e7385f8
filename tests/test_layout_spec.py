"""Layouts users give (issue 17): the JSON form read in pixels or fractions, every refusal naming
the object, `as_layout` (what the Python and HTTP APIs accept), and the PNG metadata that records
the layout so `request_fields` gives it back exactly. `LayoutFake` is the layout model the CLI,
server and page tests run (test_layout_cli.py, test_layout_serve.py, test_layout_browser.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw

from t2i.imageio import format_parameters, parse_parameters, request_fields, request_parameters
from t2i.layout.spec import Layout, LayoutError, LayoutObject, as_layout
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    per_image,
)


class LayoutFake(RequestMethods):
    """A layout model as its callers see it: takes `layout`, plans one itself when given none (a
    box over the left half per prompt), records every request it runs, draws each box, and writes
    the layout it used into every image's parameters, as issue 17's pipelines do."""

    name, family = "layout-fake", "layout_fake_family"
    defaults = GenerationDefaults(sampler="euler", steps=2, guidance=3.0, width=32, height=32)
    capabilities = Capabilities(options=frozenset({"negative_prompt", "steps", "guidance", "sampler", "width",
                                                   "height", "layout"}), samplers=("euler",), native_size=(32, 32))
    max_objects = 3  # as ShapesLayoutPipeline.max_objects

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def run(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        r = request.with_defaults(self.defaults)
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        images = []
        for prompt, negative, seed in zip(prompts, negatives, seeds, strict=True):
            layout = r.layout or Layout((LayoutObject(prompt, (0.0, 0.0, 0.5, 1.0)),))
            im = Image.new("RGB", (r.width, r.height), (128, 128, 128))
            for o in layout.objects:
                x0, y0, x1, y1 = o.box
                ImageDraw.Draw(im).rectangle((x0 * r.width, y0 * r.height, x1 * r.width - 1, y1 * r.height - 1),
                                             fill=(200, 30, 30))
            im.info["parameters"] = request_parameters(replace(r, layout=layout), prompt, negative, seed, self.name)
            images.append(im)
        return GenerationResult(images, torch.zeros(len(images), 3, r.height, r.width), seeds)


def objects(*pairs) -> list[dict]:
    return [{"phrase": p, "box": list(b)} for p, b in pairs]


# ----------------------------------------------------------------------------- the JSON form


def test_pixels_are_read_on_the_canvas_and_fractions_as_given():
    given = objects(("a red circle", (16, 0, 48, 32)), ("a blue square", (0, 32, 64, 64)))
    layout = Layout.from_json({"units": "pixels", "objects": given}, 64, 64)
    assert layout.objects == (LayoutObject("a red circle", (0.25, 0.0, 0.75, 0.5)),
                              LayoutObject("a blue square", (0.0, 0.5, 1.0, 1.0)))
    # Pixels are the default units, a bare list is the objects, a JSON string is decoded.
    assert Layout.from_json(given, 64, 64) == layout == Layout.from_json(json.dumps(given), 64, 64)
    # The same pixels on a 128x64 canvas cover half the width.
    assert Layout.from_json(given, 128, 64).objects[0].box == (0.125, 0.0, 0.375, 0.5)
    fractions = {"units": "fractions", "objects": objects(("a red circle", (0.25, 0, 0.75, 0.5)),
                                                          ("a blue square", (0, 0.5, 1, 1)))}
    assert Layout.from_json(fractions, 999, 7) == layout
    assert Layout.from_json([{"phrase": "  a star ", "box": [0, 0, 8, 8]}], 8, 8).objects[0].phrase == "a star"


BAD = [
    ({"objects": objects(("a red circle", (0, 0, 8, 8)), ("a blue square", (40, 0, 72, 32)))},
     "layout object 2 ('a blue square')", "outside the canvas"),
    ({"objects": objects(("a red circle", (-1, 0, 8, 8)))}, "layout object 1 ('a red circle')", "outside"),
    ({"objects": objects(("a red circle", (8, 8, 8, 16)))}, "layout object 1 ('a red circle')", "empty"),
    ({"objects": objects(("a red circle", (16, 8, 8, 16)))}, "layout object 1", "x1 must exceed x0"),
    ({"objects": objects(("a red circle", (0, 0, 8, 8)), ("  ", (0, 0, 8, 8)))}, "layout object 2",
     "empty phrase"),
    ({"objects": [{"box": [0, 0, 8, 8]}]}, "layout object 1", "empty phrase"),
    ({"objects": objects(("a red circle", (0, 0, 8)))}, "layout object 1 ('a red circle')", "four finite numbers"),
    ({"objects": objects(("a red circle", (0, 0, float("nan"), 8)))}, "layout object 1", "four finite numbers"),
    ({"objects": objects(("a red circle", (0, 0, True, 8)))}, "layout object 1", "four finite numbers"),
    ({"objects": ["a red circle"]}, "layout object 1", "'phrase' and 'box'"),
    # Fractions without "units": boxes under a pixel, which the message explains.
    ({"objects": objects(("a red circle", (0.1, 0.1, 0.5, 0.5)))}, "layout object 1", '"units": "fractions"'),
    ({"units": "fractions", "objects": objects(("a red circle", (0, 0, 1.5, 1)))}, "layout object 1",
     "outside the canvas"),
    ({"units": "inches", "objects": []}, "units", "'pixels' or 'fractions'"),
    ({"boxes": []}, "a layout is", '"objects"'),
    ("[{'phrase': 'a red circle'}]", "not valid JSON", "line 1"),
    (7, "a layout is", '"objects"'),
]


@pytest.mark.parametrize("data,names,problem", BAD)
def test_bad_layouts_are_refused_naming_the_object(data, names, problem):
    with pytest.raises(LayoutError) as e:
        Layout.from_json(data, 64, 64)
    assert names in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)


def test_too_many_objects_for_the_model():
    four = objects(*[(f"shape {i}", (0, 0, 8, 8)) for i in range(4)])
    assert len(as_layout(four, 64, 64).objects) == 4  # no limit given
    assert as_layout(four, 64, 64, max_objects=4) == as_layout(four, 64, 64)
    for value in (four, as_layout(four, 64, 64)):  # a Layout built by the caller is checked too
        with pytest.raises(LayoutError, match="has 4 objects; this model draws at most 3"):
            as_layout(value, 64, 64, max_objects=3)


def test_as_layout_takes_what_the_apis_accept():
    layout = Layout((LayoutObject("a red circle", (0.25, 0.0, 0.75, 0.5)),))
    assert as_layout(None, 64, 64) is None
    assert as_layout(layout, 1, 1) is layout
    for value in ([{"phrase": "a red circle", "box": [16, 0, 48, 32]}],
                  {"objects": [{"phrase": "a red circle", "box": [16, 0, 48, 32]}]},
                  '{"units": "fractions", "objects": [{"phrase": "a red circle", "box": [0.25, 0, 0.75, 0.5]}]}',
                  layout.to_json()):
        assert as_layout(value, 64, 64) == layout


# ----------------------------------------------------------------------------- PNG metadata


AWKWARD = Layout((LayoutObject('a "red", circle: big', (1 / 3, 0.1, 2 / 3, 0.7)),
                  LayoutObject("un carré bleu \\ n", (0.0, 0.703125, 10 / 48, 1.0))))


def test_png_parameters_record_the_layout_and_give_it_back_exactly():
    r = GenerationRequest("a red circle, a blue square", steps=20, guidance=7.5, sampler="euler", width=48,
                          height=64, layout=AWKWARD)
    text = request_parameters(r, r.prompt, "", 5, "layout-fake")
    assert text.count("\n") == 1 and "Layout: " in text
    params = parse_parameters(text)
    assert json.loads(params["Layout"]) == json.loads(AWKWARD.to_json())
    assert params["Model"] == "layout-fake" and params["Size"] == "48x64"  # the fields after it still parse
    fields = request_fields(params)
    assert fields["layout"] == AWKWARD  # bit for bit: 1/3 is not rounded
    assert fields["prompt"] == "a red circle, a blue square" and fields["width"] == 48
    # No layout: no key, and no layout back.
    plain = request_fields(parse_parameters(request_parameters(replace(r, layout=None), r.prompt, "", 5, "m")))
    assert "layout" not in plain


def test_quoted_values_round_trip_as_a1111_writes_them():
    """A1111 quotes a value holding `,` `:` or a newline as a JSON string; t2i wrote `"..."` without
    escapes before, which still reads back."""
    for value in ('my, "model"', "C:\\models\\a.safetensors", "two\nlines", 'end"'):
        text = format_parameters("p", steps=1, model=value)
        assert text.count("\n") == 1 and parse_parameters(text)["Model"] == value
    assert parse_parameters('p\nSteps: 1, Model: "my, model"')["Model"] == "my, model"
    assert parse_parameters('p\nSteps: 1, Model: "C:\\x, y"')["Model"] == "C:\\x, y"


def test_a_planned_layout_is_recorded_and_regenerates_the_image():
    pipe = LayoutFake()
    planned = pipe.generate("a red circle", seed=3).images[0]
    fields = request_fields(parse_parameters(planned.info["parameters"]))
    assert fields["layout"] == Layout((LayoutObject("a red circle", (0.0, 0.0, 0.5, 1.0)),))
    given = {k: v for k, v in fields.items() if k not in ("model", "precision")}
    again = pipe.generate(**given).images[0]
    assert pipe.requests[-1].layout == fields["layout"]
    assert again.tobytes() == planned.tobytes() and again.info["parameters"] == planned.info["parameters"]
