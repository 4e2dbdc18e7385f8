"""`t2i generate --upscaler FOLDER --noise-level N`: any model drawn at 1/f of the size, then finished
by a latent upscaler (issue 18), equal to the Python API's cascade; the level is recorded and read back."""

from __future__ import annotations

import pytest
from PIL import Image
from test_sd_upscale import build_upscaler

import t2i
from t2i.cli import main
from t2i.imageio import parse_parameters, request_fields
from t2i.systems.stable_diffusion import write_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cli_cascade_is_the_api_cascade_and_records_the_noise_level(tmp_path, capsys):
    pytest.importorskip("diffusers")
    upscaler = tmp_path / "up"
    build_upscaler(upscaler)
    base = write_tiny(tmp_path)
    out = tmp_path / "c.png"
    assert main(["generate", "a red circle", "--model", str(base), "--upscaler", str(upscaler), "--noise-level",
                 "50", "--width", "32", "--height", "32", "--steps", "2", "--seed", "4", "--precision", "fp32",
                 "--out", str(out)]) == 0
    want = t2i.load(upscaler).with_base(t2i.load(base)).generate("a red circle", seed=4, steps=2, width=32,
                                                                 height=32, noise_level=50).images[0]
    default = t2i.load(upscaler).with_base(t2i.load(base)).generate("a red circle", seed=4, steps=2, width=32,
                                                                    height=32).images[0]
    with Image.open(out) as im:
        assert im.size == (32, 32) and im.convert("RGB").tobytes() == want.tobytes()
        assert want.tobytes() != default.tobytes()  # the level reaches the upscaler
        assert request_fields(parse_parameters(im.info["parameters"]))["noise_level"] == 50
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(base), "--upscaler", str(base),
                 "--out", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an upscaler" in err[0] and not (tmp_path / "no.png").exists()
