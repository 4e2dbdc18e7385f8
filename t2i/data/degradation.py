"""The LDM-BSR degradation pipeline: a realistic low-res image from a clean one, for training super-resolution.

BSRGAN (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep Blind Image Super-Resolution",
sec. 3) degrades a high-res image by blur, downsampling, noise and JPEG compression applied in a random
order; LDM's super-resolution model trained on it (LDM-BSR, Rombach et al. 2022 sec. 4.4 and appendix
D.6.1, seed 003 sec. 3.5.3) generalises to real inputs where plain bicubic downsampling does not. We follow
the "light" variant LDM used (`ldm/modules/image_degradation/bsrgan_light.py`,
`degradation_bsrgan_variant`), step by step:

    optional first halving (scale 4 only, p = 0.25, any resize method) -> scale 2
    in a random order, except that the final resize always follows the intermediate one:
      blur          isotropic or anisotropic Gaussian kernel, random size and width
      intermediate  p = 0.8: resize by 1/s1, s1 ~ U(1, 2 scale), a random method;
                    else: Gaussian blur, then every scale-th pixel (nearest)
      final resize  to exactly (H / scale, W / scale), a random method
      noise         colour (p = 0.4), gray (p = 0.4) or channel-correlated (p = 0.2) Gaussian noise
      JPEG          p = 0.9, quality ~ U{q_min..q_max}
    a last JPEG compression (always)

The numbers are the light variant's (in the comments: the full BSRGAN's), with the kernel sizes capped for
our 32-128-pixel images. Left out: the camera-ISP noise (its model is not public; `bsrgan_light` runs with
`isp_model=None` too) and the half-pixel kernel shift of the nearest branch. Resizing and blurring are
torch's (`F.interpolate`, a reflect-padded convolution, as OpenCV's and `ndimage.convolve(mode="mirror")`
there), JPEG is Pillow's.

Every random draw comes from one `numpy.random.Generator` passed in (or one seeded from a torch
Generator), so a seed gives the same low-res image on every machine and run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "area")


@dataclass
class DegradationConfig:
    """Probabilities and ranges of the degradations (BSR-light's defaults; full BSRGAN's in comments).

    scale: the low-res image is (H / scale, W / scale) (the input is cropped to a multiple first).
    halve_prob: for scale 4, the chance of a first halving (then the rest works at scale 2).
    blur_prob: the chance the blur step blurs (1 in BSR; the step itself is always in the order).
    anisotropic_prob: an anisotropic kernel, else an isotropic one.
    iso_size, iso_sigma: isotropic kernel size range (odd sizes) and its sigma ~ U(0, iso_sigma * (2 + 0.2 scale)).
    aniso_size, aniso_var: anisotropic kernel size range and its two variances ~ U(0, aniso_var * (4 + scale)).
    resize_prob: the intermediate step resizes by a random factor (else blur + nearest subsampling).
    subsample_sigma: the sigma range of that blur, times scale (BSR: U(0.1, 0.6 scale), size 25).
    resize_methods: the methods a random resize chooses from.
    noise_level: Gaussian noise std range in 8-bit levels (sigma = U{a..b} / 255).
    color_noise_prob, gray_noise_prob: the two plain kinds; the rest is channel-correlated noise.
    jpeg_prob: the chance of the in-order JPEG step; final_jpeg_prob: of the last one.
    jpeg_quality: the quality range (inclusive).
    """

    scale: int = 2
    halve_prob: float = 0.25
    blur_prob: float = 1.0
    anisotropic_prob: float = 0.5
    iso_size: tuple[int, int] = (5, 7)
    iso_sigma: float = 0.25
    aniso_size: tuple[int, int] = (5, 9)  # BSR: 5..14 (for 256-pixel crops)
    aniso_var: float = 0.25
    resize_prob: float = 0.8
    subsample_sigma: tuple[float, float] = (0.1, 0.6)
    subsample_size: int = 9  # BSR: 25
    resize_methods: tuple[str, ...] = ("bilinear", "bicubic", "area")  # OpenCV's 1, 2, 3
    noise_level: tuple[int, int] = (1, 2)  # full BSRGAN: (2, 25)
    color_noise_prob: float = 0.4
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 0.9
    final_jpeg_prob: float = 1.0
    jpeg_quality: tuple[int, int] = (80, 95)  # full BSRGAN: (30, 95)

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be at least 1, got {self.scale}")
        bad = [m for m in self.resize_methods if m not in RESIZE_METHODS]
        if bad or not self.resize_methods:
            raise ValueError(f"resize methods must be among {RESIZE_METHODS}, got {self.resize_methods}")


Rng = np.random.Generator


def as_rng(generator: np.random.Generator | torch.Generator | int | None) -> Rng:
    """A numpy Generator: itself, one seeded by a draw from a torch Generator (which advances it), or
    one seeded by an int (None: from the OS, not reproducible)."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return np.random.default_rng(generator)


# ------------------------------------------------------------------ kernels


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return np.meshgrid(r, r)  # x (columns), y (rows), centred


def isotropic_kernel(size: int, sigma: float) -> torch.Tensor:
    """MATLAB's fspecial('gaussian', size, sigma), normalised: (size, size) float32."""
    x, y = _grid(size)
    k = np.exp(-(x**2 + y**2) / (2 * max(sigma, 1e-3) ** 2))
    k[k < np.finfo(np.float64).eps * k.max()] = 0
    return torch.from_numpy(k / k.sum()).float()


def anisotropic_kernel(size: int, theta: float, var1: float, var2: float) -> torch.Tensor:
    """A Gaussian with covariance V diag(var1, var2) V^T, V the rotation by theta (BSRGAN's
    `anisotropic_Gaussian`), normalised: (size, size) float32."""
    c, s = np.cos(theta), np.sin(theta)
    v = np.array([[c, s], [s, -c]])
    cov = v @ np.diag([max(var1, 1e-2), max(var2, 1e-2)]) @ v.T  # v is its own inverse
    x, y = _grid(size)
    pts = np.stack([x, y], axis=-1)  # (size, size, 2)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", pts, np.linalg.inv(cov), pts))
    return torch.from_numpy(k / k.sum()).float()


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) convolved per channel with an odd-sized (k, k) kernel, mirror-padded (reflect;
    replicate where the image is too small to reflect)."""
    k = kernel.shape[-1]
    mode = "reflect" if min(x.shape[-2:]) > k // 2 else "replicate"
    padded = F.pad(x, (k // 2,) * 4, mode=mode)
    weight = kernel.to(x.dtype).expand(x.shape[1], 1, k, k)
    return F.conv2d(padded, weight, groups=x.shape[1])


# ------------------------------------------------------------------ the degradations


def _odd(rng: Rng, low: int, high: int) -> int:
    """A random odd size in [low, high] (kernels stay centred)."""
    return int(rng.integers(low, high + 1)) | 1


def random_blur(x: torch.Tensor, cfg: DegradationConfig, rng: Rng, scale: int) -> torch.Tensor:
    """BSR's `add_blur`: an anisotropic kernel (random angle and variances) or an isotropic one."""
    if rng.random() >= cfg.blur_prob:
        return x
    if rng.random() < cfg.anisotropic_prob:
        limit = cfg.aniso_var * (4.0 + scale)
        kernel = anisotropic_kernel(_odd(rng, *cfg.aniso_size), rng.random() * np.pi, limit * rng.random(),
                                    limit * rng.random())
    else:
        kernel = isotropic_kernel(_odd(rng, *cfg.iso_size), cfg.iso_sigma * (2.0 + 0.2 * scale) * rng.random())
    return blur(x, kernel)


def resize(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C, *size) by `method` (one of RESIZE_METHODS; no antialiasing, as OpenCV)."""
    if method in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=method, align_corners=False)
    return F.interpolate(x, size=size, mode=method)


def random_resize(x: torch.Tensor, size: tuple[int, int], cfg: DegradationConfig, rng: Rng) -> torch.Tensor:
    return resize(x, size, cfg.resize_methods[int(rng.integers(len(cfg.resize_methods)))]).clamp(0, 1)


def intermediate_downsample(x: torch.Tensor, cfg: DegradationConfig, rng: Rng, scale: int) -> torch.Tensor:
    """BSR's downsample2: by a random factor in [1, 2 scale) with a random method, or a Gaussian blur
    followed by keeping every scale-th pixel."""
    h, w = x.shape[-2:]
    if rng.random() < cfg.resize_prob:
        factor = rng.uniform(1, 2 * scale)
        return random_resize(x, (max(1, int(h / factor)), max(1, int(w / factor))), cfg, rng)
    sigma = rng.uniform(cfg.subsample_sigma[0], cfg.subsample_sigma[1] * scale)
    return blur(x, isotropic_kernel(cfg.subsample_size, sigma))[..., ::scale, ::scale].clamp(0, 1)


def gaussian_noise(x: torch.Tensor, cfg: DegradationConfig, rng: Rng) -> torch.Tensor:
    """BSR's `add_Gaussian_noise`: sigma = U{a..b} / 255, independent per channel (colour), one value for
    all channels (gray), or correlated across channels with a random covariance."""
    b, c, h, w = x.shape
    level = int(rng.integers(cfg.noise_level[0], cfg.noise_level[1] + 1)) / 255.0
    u = rng.random()
    if u < cfg.gray_noise_prob:
        noise = rng.normal(0, level, (b, 1, h, w)).repeat(c, axis=1)
    elif u < cfg.gray_noise_prob + cfg.color_noise_prob:
        noise = rng.normal(0, level, (b, c, h, w))
    else:
        q, _ = np.linalg.qr(rng.random((c, c)))  # a random rotation of the channels
        cov = np.abs((cfg.noise_level[1] / 255.0) ** 2 * (q.T @ np.diag(rng.random(c)) @ q))
        noise = rng.multivariate_normal(np.zeros(c), cov, (b, h, w)).transpose(0, 3, 1, 2)
    return (x + torch.from_numpy(noise).to(x.dtype)).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image through Pillow's JPEG encoder and decoder at `quality` (8-bit round trip)."""
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(to_uint8(img)).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(from_uint8(np.asarray(decoded.convert("RGB" if img.shape[0] == 3 else "L"))))
    return torch.stack(out).to(x.dtype)


def random_jpeg(x: torch.Tensor, cfg: DegradationConfig, rng: Rng, prob: float) -> torch.Tensor:
    if rng.random() >= prob:
        return x
    return jpeg(x, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8 (rounded), or (H, W) for one channel."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32 in [0, 1]."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.array(arr, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------ the pipeline

BLUR, INTERMEDIATE, FINAL, NOISE, JPEG = range(5)


def degradation_order(rng: Rng) -> list[int]:
    """A random order of the five steps, the intermediate resize swapped before the final one if it
    fell after it (BSR keeps its "downsample3" after "downsample2")."""
    order = [int(i) for i in rng.permutation(5)]
    a, b = order.index(INTERMEDIATE), order.index(FINAL)
    if a > b:
        order[a], order[b] = order[b], order[a]
    return order


def degrade_batch(x: torch.Tensor, cfg: DegradationConfig, rng: Rng) -> torch.Tensor:
    """One degradation (one draw of everything) of x (B, C, H, W) in [0, 1] -> (B, C, H // s, W // s)."""
    scale = cfg.scale
    h, w = x.shape[-2] - x.shape[-2] % scale, x.shape[-1] - x.shape[-1] % scale
    x = x[..., :h, :w].float()  # crop to a multiple of the scale
    low = (h // scale, w // scale)
    if scale == 4 and rng.random() < cfg.halve_prob:
        x, scale = random_resize(x, (h // 2, w // 2), cfg, rng), 2
    for step in degradation_order(rng):
        if step == BLUR:
            x = random_blur(x, cfg, rng, scale).clamp(0, 1)
        elif step == INTERMEDIATE:
            x = intermediate_downsample(x, cfg, rng, scale)
        elif step == FINAL:
            x = random_resize(x, low, cfg, rng)
        elif step == NOISE:
            x = gaussian_noise(x, cfg, rng)
        else:
            x = random_jpeg(x, cfg, rng, cfg.jpeg_prob)
    return random_jpeg(x, cfg, rng, cfg.final_jpeg_prob)


Img = TypeVar("Img", np.ndarray, torch.Tensor, Image.Image)


def degrade(image: Img, cfg: DegradationConfig | None = None,
            generator: np.random.Generator | torch.Generator | int | None = None) -> Img:
    """The BSR-degraded low-res version of `image`, of the same kind:

    - a PIL image, or an (H, W, C) uint8 array -> the same at (H // scale, W // scale);
    - an (H, W, C) float array in [0, 1] -> float32 in [0, 1];
    - a torch (C, H, W) or (B, C, H, W) float tensor in [-1, 1] (t2i's training convention) -> the same,
      each image of a batch with its own draws (made one after the other from the generator).

    generator: a numpy Generator, a torch Generator or a seed (see `as_rng`); the same generator state
    gives the same output."""
    cfg = cfg or DegradationConfig()
    rng = as_rng(generator)
    if isinstance(image, Image.Image):
        return Image.fromarray(degrade(np.asarray(image.convert("RGB")), cfg, rng))
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected an (H, W, C) array, got shape {image.shape}")
        if image.dtype == np.uint8:
            return to_uint8(degrade_batch(from_uint8(image)[None], cfg, rng)[0])
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        return degrade_batch(x, cfg, rng)[0].permute(1, 2, 0).numpy()
    if image.ndim == 3:
        return degrade(image[None], cfg, rng)[0]
    x = (image.float() + 1) / 2
    low = torch.cat([degrade_batch(img[None], cfg, rng) for img in x])
    return (low * 2 - 1).to(image.dtype)
