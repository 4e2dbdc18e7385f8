"""VQGAN-CLIP (Crowson et al. 2022; seed 000, 5.1.11): no generator is trained. A VQ tokenizer's latent
grid is optimised so that the decoded image matches the prompt under a CLIP, and the result is snapped
to the codebook, so it is an image the tokenizer can write.

Per image (Crowson's notebook, "VQGAN-CLIP: Open Domain Image Generation and Editing", sec. 2):
1. z (1, D, h, w) starts as the codebook vectors of random codes (drawn from the image's seed);
2. every step, z is snapped to its nearest codebook entries with the straight-through gradient
   (z + sg(e_k - z), VQ-VAE's trick; seed 000, 7.1), decoded, and cut into `cutouts` augmented views
   (random crops of at least `cut_min` of the side, resized to the CLIP's input, plus pixel noise);
3. the loss is the mean squared spherical distance 2 arcsin(|a - b| / 2)^2 between each view's unit
   CLIP embedding and the prompt's (the notebook's ``spherical_dist_loss``), minimised by Adam on z;
4. the output is the decoded nearest codes: every latent an exact codebook entry.

The shapes world's captions name places ("in the top left", "left of"): a small crop or a mirror
would make a true caption false, so the crops stay large and nothing is flipped (the notebook's
small cutouts and flips serve open-domain prompts, where a part of a cat is still a cat).

As a family, any VQ tokenizer file (`t2i train vqvae`, VQ-VAE or VQGAN) is a model:
``t2i generate --model runs/vq/vqvae.safetensors "a red circle" --steps 100``; the CLIP is the shipped
shapes CLIP (`VQGANCLIPPipeline(..., clip=...)` takes another). `steps` is the number of Adam steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from t2i.autoencoders.vq import VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.io import is_system_file
from t2i.checkpoints.limits import load_checked_file
from t2i.imageio import request_parameters, to_pil
from t2i.quantize import precision_of
from t2i.seeds import seed_generators
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    StepReport,
    System,
    per_image,
    stop_polling,
)

SYSTEM_NAME = "vqgan_clip"
TOKENIZER_SYSTEM = "vq_autoencoder"  # the metadata of `t2i train vqvae` files (VQ-VAE and VQGAN kinds)
OPTIONS = frozenset({"steps", "sampler", "width", "height"})
SAMPLERS = ("adam",)  # the optimiser of the latent grid: the only "sampler"


class CLIPLike(Protocol):
    """What the optimisation needs of a CLIP: differentiable unit image embeddings of (N, 3, S, S) pixels
    in [-1, 1] at S = cfg.image_size, and unit text embeddings (`t2i.eval.shapes_clip.ShapesCLIP`)."""

    cfg: Any

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...


@dataclass
class VQGANCLIPConfig:
    """The optimisation's settings. lr: Adam's step in units of the codebook's standard deviation (the
    notebook's 0.1 on VQGAN's codebook); cutouts: augmented views per step; cut_min: the smallest crop
    side as a share of the image's; noise: std of the pixel noise added to each view ([-1, 1] scale)."""

    steps: int = 100
    lr: float = 0.1
    cutouts: int = 8
    cut_min: float = 0.8
    noise: float = 0.05


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 arcsin(|a - b| / 2)^2 of unit vectors a (N, P), b (N or 1, P) -> (N,): half the squared angle."""
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def snap(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, D, h, w) -> (its nearest codebook vectors with the straight-through gradient to z, the codes
    (B, h, w)). Nearest by squared distance, as the tokenizer quantizes."""
    b, d, h, w = z.shape
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, d)  # (B h w, D)
    codes = (codebook.pow(2).sum(1) - 2 * flat @ codebook.t()).argmin(1).view(b, h, w)
    z_q = F.embedding(codes, codebook).permute(0, 3, 1, 2)  # (B, D, h, w)
    return z + (z_q - z).detach(), codes


def make_cutouts(image: torch.Tensor, n: int, size: int, cut_min: float, noise: float,
                 generator: torch.Generator) -> torch.Tensor:
    """n augmented views (n, 3, size, size) of image (1, 3, H, W): a random square crop of side in
    [cut_min, 1] of the shorter side at a random place, resized (area-averaged) to size, plus
    Gaussian noise of std `noise`; every draw from `generator`."""
    _, _, h, w = image.shape
    side = min(h, w)
    views = []
    for _ in range(n):
        s = max(1, int(side * (cut_min + (1 - cut_min) * torch.rand((), generator=generator).item())))
        y = int(torch.randint(0, h - s + 1, (), generator=generator))
        x = int(torch.randint(0, w - s + 1, (), generator=generator))
        crop = image[:, :, y: y + s, x: x + s]
        views.append(F.interpolate(crop, size=(size, size), mode="area" if s > size else "bilinear",
                                   align_corners=None if s > size else False))
    views_t = torch.cat(views)  # (n, 3, size, size)
    return views_t + noise * torch.randn(views_t.shape, generator=generator)


def clamp_through(x: torch.Tensor) -> torch.Tensor:
    """x clamped to [-1, 1] with the gradient of the identity (the notebook's ClampWithGrad, simplified),
    so that saturated pixels still tell z which way to move."""
    return x + (x.clamp(-1, 1) - x).detach()


def optimise_codes(vq: VQAutoencoder, clip: CLIPLike, text: torch.Tensor, grid: tuple[int, int],
                   cfg: VQGANCLIPConfig, generator: torch.Generator, steps: int | None = None,
                   on_step: Any = None) -> torch.Tensor:
    """One image's VQGAN-CLIP optimisation (module docstring): text (1, P) the prompt's unit CLIP embedding,
    grid (h, w) the latent grid; returns its codes (1, h, w). on_step(i, pixels (1, 3, H, W), loss)
    after each step."""
    codebook = vq.quantize.codebook.detach().float()  # (K, D)
    codes = torch.randint(0, codebook.shape[0], (1, *grid), generator=generator)
    z = F.embedding(codes, codebook).permute(0, 3, 1, 2).clone().requires_grad_(True)  # (1, D, h, w)
    opt = torch.optim.Adam([z], lr=cfg.lr * float(codebook.std()))
    with torch.enable_grad():
        for i in range(cfg.steps if steps is None else steps):
            z_q, _ = snap(z, codebook)
            pixels = clamp_through(vq.decode(z_q))  # (1, 3, H, W)
            views = make_cutouts(pixels, cfg.cutouts, clip.cfg.image_size, cfg.cut_min, cfg.noise, generator)
            loss = spherical_distance(clip.encode_images(views), text).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(i, pixels.detach(), loss.item())
    return snap(z.detach(), codebook)[1]


# ---------------------------------------------------------------------------------------
# The pipeline and the family
# ---------------------------------------------------------------------------------------


class VQGANCLIPPipeline(RequestMethods):
    """A frozen VQ tokenizer and a CLIP; each image is an optimisation (`optimise_codes`).

    Args:
        vq: the tokenizer (its decoder and codebook).
        clip: the CLIP that judges the images (None: the shipped shapes CLIP).
        cfg: the optimisation's settings (`steps` is the request's default).
    """

    family = SYSTEM_NAME

    def __init__(self, vq: VQAutoencoder, clip: CLIPLike | None = None, cfg: VQGANCLIPConfig | None = None,
                 name: str = "vqgan-clip") -> None:
        if clip is None:
            from t2i.eval.shapes_clip import ShapesCLIP

            clip = ShapesCLIP.load()
        self.vq, self.clip, self.cfg, self.name = vq.eval().requires_grad_(False), clip, cfg or VQGANCLIPConfig(), name
        if isinstance(clip, torch.nn.Module):
            clip.eval().requires_grad_(False)
        size = vq.cfg.sample_size
        self.defaults = GenerationDefaults(sampler="adam", steps=self.cfg.steps, guidance=1.0, width=size, height=size)

    @property
    def capabilities(self) -> Capabilities:
        size = self.vq.cfg.sample_size
        return Capabilities(options=OPTIONS, samplers=SAMPLERS, size_multiple=self.vq.cfg.downsample_factor,
                            native_size=(size, size))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        """(B, h, w) codes -> images through the tokenizer."""
        return to_pil(self.vq.decode_codes(codes).float().clamp(-1, 1))

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        r = request.with_defaults(self.defaults)
        f = self.vq.cfg.downsample_factor
        for what, v in (("width", r.width), ("height", r.height)):
            if v < f or v % f:
                raise ValueError(f"{what} must be a multiple of the tokenizer's {f} pixels per code, got {v}")
        if r.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {r.sampler!r}; {self.name} optimises with {', '.join(SAMPLERS)}")
        if r.steps < 1:
            raise ValueError(f"steps must be at least 1, got {r.steps}")
        return r

    def run(self, request: GenerationRequest) -> GenerationResult:
        """Optimise request.num_images images per prompt; image i of seed s draws from seed s + i only."""
        with stop_polling(request.should_stop, self.vq, self.clip):
            start = time.perf_counter()
            r = self._resolve(request)
            prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
            f = self.vq.cfg.downsample_factor
            texts = {p: self.clip.embed_texts([p]).float() for p in dict.fromkeys(prompts)}  # (1, P) each
            codes = []
            with StepReport.of(r, r.steps * len(prompts)) as report:
                for k, (prompt, g) in enumerate(zip(prompts, seed_generators(seeds), strict=True)):
                    def on_step(i: int, pixels: torch.Tensor, _loss: float, k: int = k) -> None:
                        report({"i": k * r.steps + i, "denoised": pixels})

                    codes.append(optimise_codes(self.vq, self.clip, texts[prompt], (r.height // f, r.width // f),
                                                self.cfg, g, r.steps, on_step))
            sample = torch.cat(codes)  # (B, h, w)
            pictures = self.decode(sample)
            for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
                im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.vq))
            return GenerationResult(pictures, sample, seeds, [], time.perf_counter() - start)


def load_tokenizer(path: str | Path) -> VQAutoencoder:
    """A VQ tokenizer file of `t2i train vqvae` (VQ-VAE or VQGAN), checked before allocating, frozen."""
    return load_checked_file(path, TOKENIZER_SYSTEM, "a VQ autoencoder file", VQAutoencoderConfig, VQAutoencoder)


def load(path: Path, dtype: torch.dtype = torch.float32) -> VQGANCLIPPipeline:
    """A tokenizer file -> VQGANCLIPPipeline with the shipped shapes CLIP (float32: it is optimised through)."""
    return VQGANCLIPPipeline(load_tokenizer(path), name=Path(path).stem)


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """The tiny random tokenizer (16x16 images, 4x4 codes of 32) as folder/vqvae.safetensors."""
    from t2i.checkpoints.io import save_module
    from t2i.systems.token_models import tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_module(tiny_tokenizer(seed), folder / "vqvae.safetensors", TOKENIZER_SYSTEM)
    return folder / "vqvae.safetensors"


SYSTEM = System(name=SYSTEM_NAME, description="VQGAN-CLIP: a VQ tokenizer file (`t2i train vqvae`) whose latent grid "
                "is optimised per image to match the prompt under the shapes CLIP", detect=lambda path: (
                    Path(path).is_file() and is_system_file(Path(path), TOKENIZER_SYSTEM)),
                load=load, write_tiny=write_tiny)
