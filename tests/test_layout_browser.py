"""The web page's layout canvas in headless Chromium (issue 17): shown only for models that take a
layout; the user drags boxes, types what goes in each, deletes one or clears them all, and the job
the page sends carries them as `layout` in pixels of the requested size, which reaches the model.
Same requirements (and skip/fail rule) as test_serve_browser.py, whose browser fixtures it uses."""

from __future__ import annotations

import pytest
from test_layout_serve import NoLayout
from test_layout_spec import LayoutFake
from test_serve_browser import browser, new_page, requirements  # noqa: F401 - shared fixtures

from t2i.serve.app import create_app
from t2i.serve.background import BackgroundServer
from t2i.serve.config import ServeConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake():
    return LayoutFake()


@pytest.fixture(scope="module")
def server(fake):
    with BackgroundServer(create_app(fake, ServeConfig())) as srv:
        yield srv


@pytest.fixture
def page(request):
    """A new page in test_serve_browser's Chromium (taken by name: the imported fixture is not
    redefined as an argument)."""
    return new_page(request.getfixturevalue("browser"))


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press at `start` and release at `end`, given as fractions of the layout canvas."""
    b = page.locator("#layout-canvas").bounding_box()
    page.mouse.move(b["x"] + start[0] * b["width"], b["y"] + start[1] * b["height"])
    page.mouse.down()
    page.mouse.move(b["x"] + end[0] * b["width"], b["y"] + end[1] * b["height"], steps=4)
    page.mouse.up()


def sent_job(page) -> dict:
    """Click Generate; the body of the job the page posted."""
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as req:
        page.click("#generate")
    return req.value.post_data_json


def test_drawn_boxes_reach_the_model_as_a_layout(page, server, fake):
    page.goto(server.url + "/")
    page.wait_for_selector("#layout-box", state="visible")  # the fake lists "layout" in its options
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#width", "64")  # a 2:1 image: the canvas takes its aspect
    b = page.locator("#layout-canvas").bounding_box()
    assert b["width"] - 2 == pytest.approx(2 * (b["height"] - 2), abs=1)  # inside its 1 px border

    drag(page, (0.5, 0.6), (0.1, 0.1))  # dragged up and left: the box is the same
    page.keyboard.type("a red circle")  # the new box's phrase field has the focus
    drag(page, (0.6, 0.5), (0.9, 0.9))
    page.locator(".layout-phrase").nth(1).fill("a blue square")
    drag(page, (0.2, 0.2), (0.21, 0.21))  # a click, not a box
    drag(page, (0.0, 0.0), (0.3, 0.3))
    assert page.locator("#layout-canvas .layout-box").count() == 3
    page.locator(".layout-delete").nth(2).click()
    assert page.locator("#layout-canvas .layout-box").all_inner_texts() == ["1: a red circle", "2: a blue square"]

    body = sent_job(page)
    layout = body["layout"]
    assert layout["units"] == "pixels" and [o["phrase"] for o in layout["objects"]] == ["a red circle",
                                                                                        "a blue square"]
    for got, want in zip(layout["objects"], ([0.1, 0.1, 0.5, 0.6], [0.6, 0.5, 0.9, 0.9]), strict=True):
        px = [w * s for w, s in zip(want, (64, 32, 64, 32), strict=True)]
        assert all(isinstance(v, int) for v in got["box"]) and got["box"] == pytest.approx(px, abs=1.01)
    page.wait_for_selector("#gallery img.result")
    used = fake.requests[-1].layout
    assert [o.phrase for o in used.objects] == ["a red circle", "a blue square"]
    assert used.objects[0].box == (layout["objects"][0]["box"][0] / 64, layout["objects"][0]["box"][1] / 32,
                                   layout["objects"][0]["box"][2] / 64, layout["objects"][0]["box"][3] / 32)
    assert "Layout: " in page.inner_text("#gallery figcaption pre")

    page.click("#layout-clear")  # no boxes: no layout, the model plans its own
    assert page.locator("#layout-canvas .layout-box").count() == 0
    assert "layout" not in sent_job(page)


def test_a_box_without_a_phrase_is_refused_naming_it(page, server, fake):
    page.goto(server.url + "/")
    page.wait_for_selector("#layout-box", state="visible")
    page.fill("#prompt", "a red circle")
    drag(page, (0.1, 0.1), (0.5, 0.5))
    runs = len(fake.requests)
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "layout object 1: empty phrase" in page.inner_text("#status")
    assert len(fake.requests) == runs


def test_the_canvas_is_hidden_for_models_without_layouts(page):
    with BackgroundServer(create_app(NoLayout(), ServeConfig())) as srv:
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
        assert page.is_hidden("#layout-box")
