"""Train a latent super-resolution model (the SD x4 upscaler's recipe, `t2i.systems.sd_upscale`) on the shapes world.

A step: the high-res images (image_size) -> posterior samples of a frozen autoencoder (the built-in model's
f = 4 one unless told), scaled to unit variance; their low-res versions made by the LDM-BSR degradation
pipeline (`t2i.data.degradation`, scale = the autoencoder's factor; `low_res="bicubic"`: plain downsampling,
the ablation), then noised at a level drawn uniformly in 0..max_noise_level (noise conditioning
augmentation, Ho et al. 2021 sec. 4.1), the level given to the U-Net as its class label; a v-prediction
diffusion loss (Min-SNR) on the U-Net reading [noisy latents, noisy low-res image] with cross-attention to a
frozen text tower (10% empty captions for CFG).
The text tower is a small CLIP text model with random, frozen weights on the real CLIP tokenizer: the
layout's (diffusers reads the folder), while the shapes world's words need no pretrained meaning here: the
low-res image carries the content, and the frozen tower's features still tell the words apart.

The EMA U-Net is exported as an upscaler folder `OUT/model` (diffusers' StableDiffusionUpscalePipeline
layout, `t2i.load` reads it); the sample grids show, per held-out scene, the low-res input (nearest-upsampled),
the model's image and the truth; the held-out evaluation logs the PSNR of the model's images and of a plain
bicubic upsampling of the same inputs. The exported VAE config states the measured latent scale; diffusers'
StableDiffusionUpscalePipeline replaces any scale other than 0.08333 by that value when it loads a folder (with
a deprecation warning), so there set it back (`pipe.vae.register_to_config(scaling_factor=...)`) after loading.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.io import is_system_file
from t2i.checkpoints.parts import LatentDiffusionParts
from t2i.data.degradation import DegradationConfig, as_rng, degrade
from t2i.diffusion.losses import DiffusionLoss
from t2i.imageio import to_pil
from t2i.nets.unet import UNet, UNetConfig
from t2i.systems.sd_upscale import (
    LOW_RES_SCHEDULE,
    MAX_NOISE_LEVEL,
    LowResConditioned,
    SDUpscalePipeline,
    UpscaleSettings,
    noise_low_res,
    save_upscaler_folder,
)
from t2i.systems.shapes_ldm import DEFAULT_MODEL_FILE, ShapesLDM
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder
from t2i.train.autoencoder import load_vae
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import latent_scale

# U-Nets over [4 latents + 3 low-res channels], the noise level as a class label (0..350), cross-attention at
# the lowest level only (as the x4 upscaler has none at its first level).
SR_UNET_PRESETS: dict[str, UNetConfig] = {
    "shapes_sr": UNetConfig(in_channels=7, block_channels=(32, 64, 96), layers_per_block=(1, 1, 1),
                            attention=(False, False, True), num_heads=(1, 1, 4), transformer_depth=(1, 1, 1),
                            context_dim=32, linear_projection=True, only_cross_attention=(False, False, False),
                            norm_groups=8, sample_size=32, num_class_embeds=MAX_NOISE_LEVEL + 1),
    "tiny": UNetConfig(in_channels=7, block_channels=(16, 32), layers_per_block=(1, 1), attention=(False, True),
                       num_heads=(1, 2), transformer_depth=(1, 1), context_dim=32, linear_projection=True,
                       only_cross_attention=(False, False), norm_groups=8, sample_size=8,
                       num_class_embeds=MAX_NOISE_LEVEL + 1),
}
TEXT = CLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=64, eos_token_id=49407, pooling="argmax")
# The x4 upscaler's schedule (scaled-linear betas 0.0001..0.02, v-prediction), every sampler setting stated.
SCHEDULE = dataclasses.replace(LOW_RES_SCHEDULE, prediction_type="v_prediction", timestep_spacing="trailing",
                               clip_sample=False, set_alpha_to_one=True)
EVAL_SCENES = 8  # held-out scenes of the grid and the PSNR measurement


@dataclass
class SRTrainConfig(LoopConfig):
    """One super-resolution run. image_size is the high-res side; the low-res side is image_size / f
    (f: the autoencoder's factor, 4 for the built-in one: 128 -> 32 px by default)."""

    vae: str = str(DEFAULT_MODEL_FILE)  # a shapes LDM model file (its autoencoder) or a vae.safetensors
    unet_preset: str = "shapes_sr"
    image_size: int = 128
    background_p: float | None = None
    max_noise_level: int = MAX_NOISE_LEVEL  # augmentation levels drawn in 0..this
    noise_augmentation: bool = True  # False: the ablation, every low-res input at level 0
    degradation: DegradationConfig = field(default_factory=lambda: DegradationConfig(scale=4))
    low_res: str = "bsr"  # or "bicubic": the ablation, plain antialiased bicubic downsampling (held-out: BSR)
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    steps: int = 10000
    batch_size: int = 16
    lr: float = 3e-4
    export_every: int = 500
    image_every: int = 500
    sample_steps: int = 20
    noise_level: int = 20  # the exported model's default sampling level
    base: str | None = None  # the text-to-image model the exported upscaler finishes (a model name or path)
    scaling_factor: float | None = None  # measured at the start of the run


def _frozen_vae(path: str) -> AutoencoderKL:
    vae = ShapesLDM.load(path).vae if is_system_file(path, "shapes_ldm") else load_vae(path)
    return vae.requires_grad_(False).eval()


def build_sd_upscale(cfg: SRTrainConfig, run: Run) -> Task:
    if cfg.unet_preset not in SR_UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {cfg.unet_preset!r}; choose from {sorted(SR_UNET_PRESETS)}")
    vae = _frozen_vae(cfg.vae)
    f = vae.cfg.downsample_factor
    if cfg.image_size % f:
        raise ValueError(f"--image-size must be a multiple of the autoencoder's factor {f}, got {cfg.image_size}")
    cfg.degradation = dataclasses.replace(cfg.degradation, scale=f)  # the model upscales by f
    if cfg.low_res not in ("bsr", "bicubic"):
        raise ValueError(f"--low-res must be bsr or bicubic, not {cfg.low_res!r}")
    if not 0 <= cfg.max_noise_level <= MAX_NOISE_LEVEL:
        raise ValueError(f"--max-noise-level must be in 0..{MAX_NOISE_LEVEL}")
    data = open_data("shapes", None, cfg.image_size, cfg.seed, run.log.text, cfg.background_p)
    if cfg.scaling_factor is None:  # measured once, saved with the run's config
        cfg.scaling_factor = latent_scale(vae, data, n=64, batch=16)  # 64 images: plenty of latent values
    vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=cfg.scaling_factor)
    unet = UNet(dataclasses.replace(SR_UNET_PRESETS[cfg.unet_preset], sample_size=cfg.image_size // f))
    text = CLIPTextEncoder(CLIPTokenizer.default(), CLIPTextModel(TEXT).requires_grad_(False).eval(), "last")
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiffusionLoss(SCHEDULE.alphas_cumprod(), SCHEDULE.prediction_type, cfg.min_snr_gamma or None)
    low_acp = LOW_RES_SCHEDULE.alphas_cumprod()
    net = LowResConditioned(run.parallel(unet))

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents (B, 4, h, w) of the high-res images and the network's conditioning: context (B, T, 32),
        the noised degraded low-res image (B, 3, h, w) and its noise level (B,), all drawn from the step's
        generator (the degradations from a numpy generator seeded by it)."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        if cfg.low_res == "bsr":
            low = degrade(x, cfg.degradation, as_rng(gen))  # (B, 3, h, w) in [-1, 1]
        else:
            low = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True).clamp(-1, 1)
        level = (torch.randint(0, cfg.max_noise_level + 1, (len(captions),), generator=gen)
                 if cfg.noise_augmentation else torch.zeros(len(captions), dtype=torch.long))
        low = noise_low_res(low, torch.randn(low.shape, generator=gen), level, low_acp)
        z = vae.scale(vae.encode(x).sample(gen))
        return z, {"context": text.encode(captions).context.float(), "low_res": low, "noise_level": level}

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        z, cond = batch
        loss = loss_fn(net, z, cond, s.generator)
        gnorm = s.update(loss, opt, unet.parameters())
        return {"sr/loss": loss.item(), "sr/grad_norm": gnorm}

    held_out = open_data("shapes", None, cfg.image_size, cfg.seed + 1_000_003, lambda _: None, cfg.background_p)
    truth, truth_captions, _ = held_out.batch(0, EVAL_SCENES, DistInfo())
    inputs = degrade(truth, cfg.degradation, np.random.default_rng(0))  # fixed: comparable along the run

    def pipeline() -> SDUpscalePipeline:
        settings = UpscaleSettings(noise_level=cfg.noise_level, base=cfg.base,
                                   defaults={"steps": cfg.sample_steps, "guidance": 1.0, "sampler": "dpmpp_2m"})
        return SDUpscalePipeline(ema.averaged, vae, text, SCHEDULE, LOW_RES_SCHEDULE, settings, name="shapes-sr")

    @torch.no_grad()
    def upscaled() -> torch.Tensor:
        """The EMA model's images of the held-out inputs, (N, 3, H, W) in [-1, 1] (float, before rounding)."""
        pipe = pipeline()
        settings = {"steps": cfg.sample_steps, "guidance": 1.0, "sampler": "dpmpp_2m"}
        latents = torch.cat([pipe.upscale(im, c, seed=i, **settings).sample
                             for i, (im, c) in enumerate(zip(to_pil(inputs), truth_captions, strict=True))])
        return vae.decode(vae.unscale(latents)).clamp(-1, 1)

    def grid() -> Grid:
        near = F.interpolate(inputs, size=truth.shape[-2:], mode="nearest")
        images = torch.cat([near, upscaled(), truth])
        n = len(truth_captions)
        return Grid(images, ["low-res input"] * n + ["upscaled"] * n + truth_captions, nrow=n)

    def evaluate(at: int) -> None:
        bicubic = F.interpolate(inputs, size=truth.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        run.log.scalars(at, {"sr/psnr": psnr(upscaled(), truth), "sr/psnr_bicubic": psnr(bicubic, truth)})

    def export() -> None:
        pipe = pipeline()
        parts = LatentDiffusionParts(pipe.unet, vae, text, SCHEDULE, "shapes-sr", "sd1",
                                     "DPMSolverMultistepScheduler")
        out, new = Path(cfg.out) / "model", Path(cfg.out) / "model.new"
        shutil.rmtree(new, ignore_errors=True)
        save_upscaler_folder(parts, LOW_RES_SCHEDULE, pipe.settings, new)
        shutil.rmtree(out, ignore_errors=True)
        new.rename(out)

    n_params = sum(p.numel() for p in unet.parameters())
    about = (f", U-Net {n_params / 1e6:.2f}M parameters, {cfg.image_size // f} -> {cfg.image_size} px, "
             f"latent scale {cfg.scaling_factor:.4f}")
    return Task("sd_upscale", {"unet": unet, "ema": ema.averaged, "text": text.model}, {"opt": opt},
                prepare=prepare, step=step, ema=ema, grid=grid, grid_name="sr", export=export, evaluate=evaluate,
                about=about)


def psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - truth).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(4 / mse)).mean())


def train_sd_upscale(cfg: SRTrainConfig, resume: bool = False, resume_lr: float | None = None,
                     given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a super-resolution training. Returns the exit code."""
    return fit(cfg, build_sd_upscale, resume=resume, resume_lr=resume_lr, given=given)
