"""Memory under img2img load: hundreds of requests whose init image and mask are large single-colour
PNGs (small files, 2048x2048 decoded) must leave the server's RSS flat. Inputs are resized to the
job's size as they are decoded and finished jobs drop them, so nothing full-size is retained (before
that, each retained job held its decoded inputs: 64 retained jobs x 24 MB)."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from test_serve import model_folder_fixture, pipe_fixture, request, serve  # noqa: E402, F401 - shared fixtures, helpers

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 2048  # decoded pixels per side; 4096 (the default max_init_pixels) works too, 4x slower to decode


def rss_mb() -> float:
    """Resident set size of this process (the server runs in it), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="reads /proc (Linux)")
def test_rss_stays_flat_over_hundreds_of_large_img2img_requests(pipe):
    body = {"prompt": "a red circle", "steps": 1, "width": 16, "height": 16, "denoising_strength": 0.5,
            "init_images": [b64_png(Image.new("RGB", (SIDE, SIDE), (200, 30, 30)))],
            "mask": b64_png(Image.new("L", (SIDE, SIDE), 255))}
    with serve(pipe, max_queue=8, max_batch=1) as s, ThreadPoolExecutor(2) as pool:

        def send(i: int) -> int:
            return request("POST", s.url + "/sdapi/v1/img2img", {**body, "seed": i})[0]

        assert set(pool.map(send, range(40))) == {200}  # warm-up: allocator pools, retained-job list full
        before, t0 = rss_mb(), time.monotonic()
        codes = list(pool.map(send, range(40, 240)))
        after, seconds = rss_mb(), time.monotonic() - t0
        print(f"RSS {before:.0f} MB -> {after:.0f} MB over {len(codes)} requests of two {SIDE}x{SIDE} inputs "
              f"({seconds:.0f} s); {len(s.queue.jobs)} jobs retained")
        assert set(codes) == {200}
        assert len(s.queue.jobs) >= 64  # the retention list is full: what it holds is what is measured
        assert after - before < 60, (before, after)
