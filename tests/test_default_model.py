"""The built-in model ships inside the package, loads without a path and generates."""

from __future__ import annotations

import numpy as np

import t2i
from t2i.systems.shapes_ldm import DEFAULT_MODEL_FILE


def test_shipped_model_is_small_and_generates():
    assert DEFAULT_MODEL_FILE.stat().st_size <= 40 * 2**20  # the budget for shipped weights
    pipe = t2i.load()
    result = pipe.generate("a red circle on a black background", seed=3, steps=4)
    image = np.asarray(result.images[0])
    assert image.shape == (64, 64, 3)
    assert "Model: t2i-shapes" in result.images[0].info["parameters"]
    assert np.isfinite(result.latents).all() and image.std() > 1.0  # a picture, not a flat or broken one
    # same seed, same image
    again = pipe.generate("a red circle on a black background", seed=3, steps=4)
    assert again.images[0].tobytes() == result.images[0].tobytes()
