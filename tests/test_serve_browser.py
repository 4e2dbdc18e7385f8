"""The web page in headless Chromium: type a prompt, generate, see the image and its parameters.

Needs Debian's `chromium` (/usr/bin/chromium, or T2I_CHROMIUM=PATH) and the `playwright` Python
package, which drives that browser through executable_path (no browser download). Skips with a
message naming what is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (drives the system "
                                                                   "chromium; no browser download needed)")

CHROMIUM = os.environ.get("T2I_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None or not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install -y chromium, or set T2I_CHROMIUM)",
                allow_module_level=True)

import t2i  # noqa: E402
from t2i.imageio import parse_parameters  # noqa: E402
from t2i.serve.app import create_app  # noqa: E402
from t2i.serve.background import BackgroundServer  # noqa: E402
from t2i.serve.config import ServeConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_page_generates_an_image(tmp_path):
    from sd_oracles import build_sd1

    build_sd1(tmp_path / "sd1")
    pipe = t2i.load(tmp_path / "sd1")
    app = create_app(pipe, ServeConfig(api_key="page-key"))
    with BackgroundServer(app) as server, playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            # Without the key the page says so; with it, it loads the model's settings.
            page.wait_for_selector("#status.error")
            page.wait_for_selector("#key-box[open]")  # the page opened its key field on the 401
            page.fill("#api_key", "page-key")
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
            assert page.input_value("#sampler") == pipe.defaults.sampler
            page.fill("#prompt", "a red circle above a blue square")
            page.fill("#negative_prompt", "blurry")
            page.fill("#width", "32")
            page.fill("#height", "24")
            page.fill("#steps", "40")
            page.fill("#guidance", "6")
            page.fill("#seed", "1234")
            page.select_option("#sampler", "euler_a")
            page.click("#generate")
            page.wait_for_selector("#progress:not([hidden])")  # the bar shows while it runs
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
        finally:
            browser.close()
