"""The web page in headless Chromium: type a prompt, generate, see the image and its parameters;
late /v1/info replies never undo what the user typed; the form's layout holds at desktop and phone
widths.

Needs Debian's `chromium` (/usr/bin/chromium, or T2I_CHROMIUM=PATH) and the `playwright` Python
package, which drives that browser through executable_path (no browser download). Locally it skips
with a message naming what is missing; under `CI=true` it fails instead, so CI cannot pass without
having run it.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import shutil
import time

import pytest

import t2i
from t2i.imageio import parse_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "page-key"
CHROMIUM = os.environ.get("T2I_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = [msg for absent, msg in [
    (importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None,
     'the server\'s dependencies (pip install -e ".[serve]")'),
    (importlib.util.find_spec("playwright") is None,
     "playwright (pip install playwright; it drives the system chromium, no browser download needed)"),
    (CHROMIUM is None or not os.path.exists(CHROMIUM),
     "chromium (apt-get install -y chromium, or set T2I_CHROMIUM)"),
] if absent]


@pytest.fixture(scope="module", autouse=True)
def requirements():
    """Skip (locally) or fail (CI=true) each test, so that the rest of the suite still runs."""
    if MISSING:
        reason = "browser test needs " + " and ".join(MISSING)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: this test must run, not skip)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from sd_oracles import build_sd1

    folder = tmp_path_factory.mktemp("browser") / "sd1"
    build_sd1(folder)
    return t2i.load(folder)


@pytest.fixture(scope="module")
def server(pipe):
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import ServeConfig

    with BackgroundServer(create_app(pipe, ServeConfig(api_key=KEY))) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def new_page(browser, **kwargs):
    page = browser.new_page(**kwargs)
    page.set_default_timeout(30_000)
    return page


def hold_info(page):
    """Hold every /v1/info request unanswered until the test releases it: a late reply on demand."""
    held = []
    page.route("**/v1/info", lambda route: held.append(route))  # playwright needs a Python function
    return held


def wait_held(page, held, n):
    deadline = time.monotonic() + 30
    while len(held) < n:  # each sync call lets playwright deliver pending route events
        assert time.monotonic() < deadline, f"{len(held)} /v1/info requests held, expected {n}"
        page.wait_for_timeout(20)


def enter_key(page):
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")


def test_page_generates_an_image(browser, server, pipe):
    page = new_page(browser)
    page.goto(server.url + "/")
    # Without the key the page says so; with it, it loads the model's settings.
    page.wait_for_selector("#status.error")
    page.wait_for_selector("#key-box[open]")  # the page opened its key field on the 401
    enter_key(page)
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    assert page.input_value("#sampler") == pipe.defaults.sampler
    # Filling the prompt moves the focus off the key field, which fires its change event once more
    # (the race of issue 14.2: a second /v1/info reply then reset width, height and steps).
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#negative_prompt", "blurry")
    page.fill("#width", "32")
    page.fill("#height", "24")
    page.fill("#steps", "40")
    page.fill("#guidance", "6")
    page.fill("#seed", "1234")
    page.select_option("#sampler", "euler_a")
    # The bar shows while the job runs; the page records it, as a tiny job can finish before a poll.
    page.evaluate("""() => { const bar = document.querySelector('#progress'); window.barShown = false;
        new MutationObserver(() => { window.barShown ||= !bar.hidden; }).observe(bar, {attributes: true}); }""")
    page.click("#generate")
    img = page.wait_for_selector("#gallery figure img.result")
    page.wait_for_function("document.querySelector('#gallery img.result').naturalWidth > 0")
    assert page.evaluate("[document.querySelector('#gallery img.result').naturalWidth, "
                         "document.querySelector('#gallery img.result').naturalHeight]") == [32, 24]
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    params = parse_parameters(page.inner_text("#gallery figcaption pre"))
    assert params["prompt"] == "a red circle above a blue square"
    assert params["negative_prompt"] == "blurry"
    assert (params["Seed"], params["Steps"], params["Sampler"], params["CFG scale"], params["Size"]) == (
        "1234", "40", "Euler a", "6.0", "32x24")
    assert "done: seed 1234" in page.inner_text("#status")
    assert page.is_hidden("#progress")
    assert page.evaluate("window.barShown")


def test_late_info_reply_keeps_what_the_user_typed(browser, server, pipe):
    page = new_page(browser)
    page.add_init_script(f"localStorage.setItem('t2i_api_key', '{KEY}')")
    held = hold_info(page)
    page.goto(server.url + "/")
    wait_held(page, held, 1)
    page.fill("#width", "32")  # typed while the page's first /v1/info is still on its way
    held[0].continue_()
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")
    d = pipe.defaults
    assert page.input_value("#width") == "32"
    assert page.input_value("#height") == str(d.height)  # fields the user left alone take the defaults
    assert page.input_value("#steps") == str(d.steps)
    # Another request (what an API-key change sends) answered after more edits, the sampler's too.
    page.fill("#steps", "7")
    page.select_option("#sampler", "euler_a")
    page.evaluate("void loadInfo()")
    wait_held(page, held, 2)
    with page.expect_response("**/v1/info"):
        held[1].continue_()
    page.wait_for_timeout(100)  # let the page's handler of that reply run
    assert [page.input_value(f"#{f}") for f in ("width", "height", "steps", "sampler")] == [
        "32", str(d.height), "7", "euler_a"]


def test_stale_info_reply_is_ignored(browser, server, pipe):
    page = new_page(browser)
    held = hold_info(page)
    page.goto(server.url + "/")
    wait_held(page, held, 1)  # sent without a key: its answer will be 401
    page.click("#key-box summary")  # the user opens the key field before that answer came
    enter_key(page)
    wait_held(page, held, 2)  # sent with the key
    held[1].continue_()
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    assert page.inner_text("#status") == ""
    with page.expect_response("**/v1/info") as response:
        held[0].continue_()  # the older request's 401 arrives last
    assert response.value.status == 401
    page.wait_for_timeout(100)  # let the page's handler of that reply run
    assert page.inner_text("#status") == "", "a stale 401 overwrote the status of the newer request"
    assert page.input_value("#sampler") == pipe.defaults.sampler


def png_b64(size: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (230, 25, 25)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BOX = ("(s) => { const b = document.querySelector(s).getBoundingClientRect(); "
       "return [b.left, b.top, b.right, b.bottom]; }")


@pytest.mark.parametrize("width,height", [(1200, 800), (390, 844)])
def test_form_layout_holds(browser, server, width, height):
    """Issue 14.11: at 1200 px the Sampler field stuck out of the form (clipped by the gallery), and
    once the gallery had two rows the form stretched to its height, its fields spread apart."""
    page = new_page(browser, viewport={"width": width, "height": height})
    page.add_init_script(f"localStorage.setItem('t2i_api_key', '{KEY}')")
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    form, sampler = page.evaluate(BOX, "#form"), page.evaluate(BOX, "#sampler")
    assert form[0] <= sampler[0] and sampler[2] <= form[2] + 0.5, (sampler, form)
    assert form[2] <= width, f"the form is wider than the {width} px window: {form}"
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling
    fields = {s: page.evaluate(BOX, s) for s in ("#form", "#prompt", "#sampler", "#generate")}
    image = {"b64_json": png_b64(), "parameters": "a red circle\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64"}
    for _ in range(7):  # several gallery rows at either width
        page.evaluate("(image) => addToGallery(image)", image)
    rows = page.evaluate("new Set([...document.querySelectorAll('#gallery figure')]"
                         ".map((f) => f.getBoundingClientRect().top)).size")
    assert rows >= 2
    assert {s: page.evaluate(BOX, s) for s in fields} == fields, "the form moved when the gallery grew"
