"""The LDM-BSR degradation pipeline (`t2i.data.degradation`): each step does what it says, the whole is
exact in size and reproducible from its generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.degradation import (
    BLUR,
    FINAL,
    INTERMEDIATE,
    DegradationConfig,
    anisotropic_kernel,
    blur,
    degradation_order,
    degrade,
    gaussian_noise,
    intermediate_downsample,
    isotropic_kernel,
    jpeg,
    random_blur,
    resize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def scene(size: int = 64, seed: int = 0) -> np.ndarray:
    """A shapes-like uint8 image: flat background, hard-edged rectangles, a little texture."""
    g = np.random.default_rng(seed)
    img = np.full((size, size, 3), 240, np.uint8)
    for _ in range(4):
        x0, y0 = g.integers(0, size - 12, 2)
        w, h = g.integers(6, 20, 2)
        img[y0:y0 + h, x0:x0 + w] = g.integers(0, 255, 3)
    img[::7, ::5] = 30
    return img


def high_freq_energy(x: torch.Tensor) -> float:
    """Mean squared Laplacian response: the energy of the finest detail."""
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
    return blur(x, lap).pow(2).mean().item()  # blur() is a plain per-channel convolution


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]


def test_kernels_are_normalised_gaussians():
    iso = isotropic_kernel(7, 1.2)
    assert iso.shape == (7, 7) and abs(iso.sum().item() - 1) < 1e-6
    assert torch.allclose(iso, iso.T) and iso.argmax() == 24  # symmetric, peaked at the centre
    aniso = anisotropic_kernel(9, 0.0, 4.0, 0.25)  # wide along x (columns), narrow along y
    assert abs(aniso.sum().item() - 1) < 1e-6
    assert aniso[4, :].sum() > 3 * aniso[:, 4].sum()
    rotated = anisotropic_kernel(9, np.pi / 2, 4.0, 0.25)
    assert torch.allclose(rotated, aniso.T, atol=1e-6)


def test_blur_lowers_high_frequency_energy():
    x = as_tensor(scene())
    cfg = DegradationConfig()
    for seed in range(4):
        blurred = random_blur(x, cfg, np.random.default_rng(seed), 2)
        assert blurred.shape == x.shape
        assert high_freq_energy(blurred) < 0.8 * high_freq_energy(x)
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(blur(flat, isotropic_kernel(5, 1.0)), flat, atol=1e-6)  # kernels keep the mean


def test_jpeg_at_low_quality_differs_and_keeps_the_size():
    x = as_tensor(scene())
    low, high = jpeg(x, 10), jpeg(x, 95)
    assert low.shape == high.shape == x.shape
    err_low, err_high = (low - x).abs().mean().item(), (high - x).abs().mean().item()
    assert err_low > 2 * err_high and err_low > 0.01


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "area"])
def test_resize_methods_give_the_size_asked(method):
    x = as_tensor(scene())
    out = resize(x, (20, 27), method)
    assert out.shape == (1, 3, 20, 27)


def test_resize_methods_differ():
    x = as_tensor(scene())
    # at a non-integer factor (at exactly 1/2, bilinear without antialiasing is the 2x2 mean, as area)
    outs = [resize(x, (27, 27), m) for m in ("nearest", "bilinear", "bicubic", "area")]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 0.05


def test_noise_kinds():
    x = torch.full((1, 3, 64, 64), 0.5)
    rng = np.random.default_rng(0)
    gray = gaussian_noise(x, DegradationConfig(noise_level=(10, 10), gray_noise_prob=1.0, color_noise_prob=0.0), rng)
    colour = gaussian_noise(x, DegradationConfig(noise_level=(10, 10), gray_noise_prob=0.0, color_noise_prob=1.0),
                            rng)
    correlated = gaussian_noise(x, DegradationConfig(noise_level=(10, 10), gray_noise_prob=0.0,
                                                     color_noise_prob=0.0), rng)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert abs((gray - x).std().item() - 10 / 255) < 0.1 * 10 / 255
    assert not torch.equal(colour[:, 0], colour[:, 1])
    assert abs((colour - x).std().item() - 10 / 255) < 0.1 * 10 / 255
    assert 0 < (correlated - x).std().item() < 10 / 255 * 1.01  # variances in U(0, 1) of the level's


def test_intermediate_downsample_shrinks():
    x = as_tensor(scene())
    for seed in range(6):
        out = intermediate_downsample(x, DegradationConfig(), np.random.default_rng(seed), 2)
        assert 16 <= out.shape[-1] <= 64 and out.shape[-2] == out.shape[-1]
    nearest = intermediate_downsample(x, DegradationConfig(resize_prob=0.0), np.random.default_rng(0), 2)
    assert nearest.shape == (1, 3, 32, 32)


def test_the_final_resize_always_follows_the_intermediate_one():
    for seed in range(50):
        order = degradation_order(np.random.default_rng(seed))
        assert sorted(order) == list(range(5)) and order.index(INTERMEDIATE) < order.index(FINAL)
    firsts = {degradation_order(np.random.default_rng(s))[0] for s in range(50)}
    assert BLUR in firsts and len(firsts) >= 3  # the order really is random


@pytest.mark.parametrize(("size", "scale", "expected"), [((64, 64), 2, (32, 32)), ((50, 63), 2, (25, 31)),
                                                          ((128, 96), 4, (32, 24)), ((33, 40), 1, (33, 40))])
def test_output_size_is_exact(size, scale, expected):
    img = np.asarray(Image.fromarray(scene(128)).resize((size[1], size[0])))
    cfg = DegradationConfig(scale=scale)
    for seed in range(5):
        assert degrade(img, cfg, seed).shape == (*expected, 3)


def test_same_seed_same_output_and_different_seeds_differ():
    img = scene()
    a, b, c = degrade(img, None, 7), degrade(img, None, 7), degrade(img, None, 8)
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert np.array_equal(degrade(img, None, g1), degrade(img, None, g2))


def test_kinds_in_kinds_out():
    img = scene()
    pil = degrade(Image.fromarray(img), None, 1)
    assert isinstance(pil, Image.Image) and pil.size == (32, 32)
    assert np.array_equal(np.asarray(pil), degrade(img, None, 1))
    floats = degrade(img.astype(np.float32) / 255, None, 1)
    assert floats.dtype == np.float32 and floats.shape == (32, 32, 3) and 0 <= floats.min() and floats.max() <= 1
    batch = torch.from_numpy(np.stack([scene(seed=0), scene(seed=1)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = degrade(batch, None, np.random.default_rng(5))
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    # image i of a batch has its own draws: one after the other from the same generator
    rng = np.random.default_rng(5)
    first = degrade(batch[0], None, rng)
    second = degrade(batch[1], None, rng)
    assert torch.allclose(out[0], first) and torch.allclose(out[1], second)


def test_the_degraded_image_stays_close_to_a_plain_downsample():
    """Degraded, but the same picture: closer to the bicubic downsample of its own image than of another."""
    img, other = scene(seed=0), scene(seed=1)
    low = as_tensor(degrade(img, None, 2))
    mine = resize(as_tensor(img), (32, 32), "area")
    theirs = resize(as_tensor(other), (32, 32), "area")
    assert (low - mine).abs().mean() < 0.5 * (low - theirs).abs().mean()
    assert (low - mine).abs().mean() > 1e-3  # and not untouched
