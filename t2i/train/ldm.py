"""Train the latent diffusion U-Net on a frozen autoencoder and a frozen text encoder.

The step function for `t2i.train.fit` with SD's conditioning: images -> posterior sample of the
frozen VAE (scaled) -> DiffusionLoss (eps or v, Min-SNR weighting) on the U-Net with
cross-attention to MiniLM token states (the step's captions encoded as one batch), 10% of captions replaced
by the empty caption so one network also learns the unconditional model for CFG, AdamW
with linear warm-up, gradient clipping, EMA weights. The EMA model is exported as a
self-describing `model.safetensors` (`t2i.systems.shapes_ldm.ShapesLDM`) and sampled into
captioned PNG grids along the way.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from t2i.diffusion.losses import DiffusionLoss
from t2i.systems.shapes_ldm import UNET_PRESETS, ShapesLDM, ShapesLDMConfig, load_text_encoder
from t2i.train.autoencoder import load_vae
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit

# Prompts of the periodic sample grids: one per judge family.
SAMPLE_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow diamond",
    "a small purple cross on the left", "a large orange circle in the top right",
    "a red circle above a blue square", "a cyan square left of a pink triangle",
    "a green circle and a yellow square", "three blue circles", "two red squares and a green cross",
    "a purple diamond on a black background", "a pink circle on a gray background", "a large blue diamond",
    "an orange cross below a cyan circle", "four yellow triangles",
]


@dataclass
class LDMTrainConfig(LoopConfig):
    """One latent diffusion run. `model` is filled in from the presets and the VAE file at the
    start of the run (with the latent scaling factor measured) and saved in every checkpoint."""

    vae_path: str = ""  # vae.safetensors written by `t2i train autoencoder`
    unet_preset: str = "shapes_s"
    prediction_type: str = "v_prediction"
    min_snr_gamma: float = 5.0  # 0: plain MSE
    caption_dropout: float = 0.1
    data: str = "shapes"
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 20000
    batch_size: int = 32  # per rank
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    bf16: bool = False
    export_every: int = 500
    sample_steps: int = 20
    # Warm start from a shipped model file (ShapesLDM): its config, autoencoder and U-Net (as both the
    # trained and the EMA weights; the optimizer starts afresh). How training continues across
    # machines that keep nothing but the repository. vae_path may then be empty.
    init_from: str | None = None
    # SDXL-style training (Podell et al. 2023, sec. 2.2-2.4). aspect_buckets: the shapes world at many
    # aspect ratios, or a folder's / manifest's images at their own sizes, batched by bucket
    # (`t2i.train.buckets`); micro_conditioning: the U-Net embeds each image's original size and crop
    # top-left (plus the target size) into its time embedding (needs aspect_buckets; on a warm start it is
    # added to the init's U-Net, starting at zero); timestep_range: [lo, hi) of the training timesteps,
    # e.g. (0, 200) for a refiner-style expert on the lowest noise levels (None: all T).
    aspect_buckets: bool = False
    center_crop: bool = False  # the baseline: the same many-aspect originals, centre-cropped to the square
    # with aspect_buckets: (share, largest factor) of images enlarged, then randomly cropped (SDXL's crops)
    crop_zoom: tuple[float, float] | None = None
    micro_conditioning: bool = False
    timestep_range: tuple[int, int] | None = None
    model: dict[str, Any] | None = None  # the resolved ShapesLDMConfig

# Width of each micro-conditioning id's sinusoidal embedding (SDXL: 256 for 1024 px images).
MICRO_CONDITIONING_DIM = 64
N_TIME_IDS = 6  # original h, w, crop top, left, target h, w


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, data, n: int = 256, batch: int = 32) -> float:
    """1 / std of posterior samples of the first n items (LDM's scaling factor: the latents the
    U-Net trains on, which are posterior samples, get unit variance)."""
    zs, gen = [], torch.Generator().manual_seed(0)
    for pos in range(0, n, batch):
        x, _, _ = data.batch(pos, batch, DistInfo())
        zs.append(vae.encode(x).sample(gen).flatten())  # flat: aspect buckets differ in shape
    return float(1.0 / torch.cat(zs).std())


def resolve_model_config(cfg: LDMTrainConfig, vae: torch.nn.Module, data) -> ShapesLDMConfig:
    unet_cfg = dataclasses.replace(UNET_PRESETS[cfg.unet_preset])
    model_cfg = ShapesLDMConfig(vae=dataclasses.replace(vae.cfg), unet=unet_cfg, image_size=cfg.image_size)
    model_cfg.schedule.prediction_type = cfg.prediction_type
    model_cfg.vae.scaling_factor = latent_scale(vae, data)
    model_cfg.unet.sample_size = cfg.image_size // model_cfg.vae.downsample_factor
    if cfg.micro_conditioning:
        with_micro_conditioning(model_cfg)
    return model_cfg


def with_micro_conditioning(model_cfg: ShapesLDMConfig) -> ShapesLDMConfig:
    """model_cfg with a U-Net that embeds the time ids alone (SDXL's added embedding, no pooled text)."""
    model_cfg.unet.addition_time_embed_dim = MICRO_CONDITIONING_DIM
    model_cfg.unet.projection_class_embeddings_input_dim = N_TIME_IDS * MICRO_CONDITIONING_DIM
    return model_cfg


def load_warm_start(unet: torch.nn.Module, init: torch.nn.Module) -> None:
    """The init U-Net's weights into `unet`. A U-Net given micro-conditioning on top of a model without it
    gets its added embedding new, with a zero output layer: the run starts from exactly the init's
    predictions and learns what the size and crop ids add (as ControlNet's zero convolutions do)."""
    missing, unexpected = unet.load_state_dict(init.state_dict(), strict=False)
    new = [k for k in missing if k.startswith("add_embedding.")]
    if unexpected or len(new) != len(missing):
        raise ValueError(f"--init-from: the U-Net does not fit this run's (missing {missing}, unexpected {unexpected})")
    if new:
        torch.nn.init.zeros_(unet.add_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.add_embedding.linear_2.bias)


def size_multiple(cfg: LDMTrainConfig, vae: torch.nn.Module, init: ShapesLDM | None) -> int | None:
    """Pixel multiple every bucket side needs (the VAE's factor times the U-Net's downsamplings);
    None without aspect buckets."""
    if not cfg.aspect_buckets:
        return None
    unet = (ShapesLDMConfig.from_dict(cfg.model).unet if cfg.model is not None
            else init.cfg.unet if init is not None else UNET_PRESETS[cfg.unet_preset])
    return vae.cfg.downsample_factor * 2 ** (len(unet.block_channels) - 1)


def shifted_timesteps(net: torch.nn.Module, lo: int):
    """The network for a DiffusionLoss over alphas_cumprod[lo:hi]: the loss draws t' in
    [0, hi - lo) (and weighs it by alphas_cumprod[lo + t']), the network sees t' + lo."""
    if lo == 0:
        return net
    return lambda x, t, **cond: net(x, t + lo, **cond)


def build_ldm(cfg: LDMTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    init = ShapesLDM.load(cfg.init_from) if cfg.init_from else None
    vae = init.vae if init is not None else load_vae(cfg.vae_path)
    bucketed = cfg.aspect_buckets or cfg.center_crop
    if cfg.micro_conditioning and not bucketed:
        raise ValueError("--micro-conditioning conditions on the crops of --aspect-buckets or --center-crop")
    if cfg.aspect_buckets and cfg.center_crop:
        raise ValueError("give one of --aspect-buckets and --center-crop")
    if cfg.crop_zoom is not None and not cfg.aspect_buckets:
        raise ValueError("--crop-zoom enlarges and crops the images of --aspect-buckets: give that too")
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers, size_multiple=size_multiple(cfg, vae, init), center_crop=cfg.center_crop,
                     crop_zoom=None if cfg.crop_zoom is None else (float(cfg.crop_zoom[0]), float(cfg.crop_zoom[1])))
    if cfg.model is None:
        if init is None:
            cfg.model = resolve_model_config(cfg, vae, data).to_dict()
        else:  # the init's model, with micro-conditioning added when asked (a copy: init.cfg stays its own)
            start = copy.deepcopy(init.cfg)
            cfg.model = (with_micro_conditioning(start) if cfg.micro_conditioning else start).to_dict()
    model_cfg = ShapesLDMConfig.from_dict(cfg.model)
    vae.cfg.scaling_factor = model_cfg.vae.scaling_factor
    text = text_encoder or load_text_encoder(model_cfg)

    system = ShapesLDM(model_cfg)  # holds the U-Net being trained and the frozen VAE it samples with
    system.vae.load_state_dict(vae.state_dict())
    system.vae.requires_grad_(False).eval()
    unet = system.unet
    if init is not None:
        load_warm_start(unet, init.unet)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    acp = model_cfg.schedule.alphas_cumprod()
    lo, hi = cfg.timestep_range or (0, len(acp))
    if not 0 <= lo < hi <= len(acp):
        raise ValueError(f"--timestep-range {lo} {hi} is not within [0, {len(acp)}]")
    loss_fn = DiffusionLoss(acp[lo:hi], cfg.prediction_type, cfg.min_snr_gamma or None)
    micro = unet.add_embedding is not None
    if micro and not bucketed:
        raise ValueError("this model has micro-conditioning: train it with --aspect-buckets or --center-crop")
    net = shifted_timesteps(run.parallel(unet), lo)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Everything frozen for one step: latents (B, 4, h, w) and the network's conditioning:
        context (B, T, 384), with micro-conditioning time_ids (B, 6); draws the caption dropout and
        the posterior samples from the step's generator."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        z = vae.scale(vae.encode(x).sample(gen))  # (B, 4, h, w) diffusion latents
        # One batched call per step (not per caption, not cached): 3x cheaper than single captions,
        # and a step's batch is fixed by its position, so a resumed run sees the same numbers.
        cond = {"context": text.encode(captions).context.float()}
        if micro:
            cond["time_ids"] = data.time_ids(position, cfg.batch_size, run.info)
        return z, cond

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        z, cond = batch
        with autocast:
            loss = loss_fn(net, z, cond, s.generator)
        gnorm = s.update(loss, opt, unet.parameters())
        return {"ldm/loss": loss.item(), "ldm/grad_norm": gnorm}

    def export() -> None:
        shipped = ShapesLDM(model_cfg)
        shipped.vae.load_state_dict(vae.state_dict())
        shipped.unet.load_state_dict(ema.averaged.state_dict())
        shipped.save(Path(cfg.out) / "model.safetensors")

    n_params = sum(p.numel() for p in unet.parameters())
    about = (f", U-Net {n_params / 1e6:.2f}M parameters, latent scale {model_cfg.vae.scaling_factor:.4f}"
             + (f", warm start from {cfg.init_from}" if init is not None else ""))
    return Task("ldm", {"unet": unet, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=lambda: sample_grid(ema.averaged, system, text, cfg.sample_steps), export=export, about=about)


def train_ldm(cfg: LDMTrainConfig, resume: bool = False, resume_lr: float | None = None,
              text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a latent diffusion training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding; default the config's MiniLM.
    """
    return fit(cfg, partial(build_ldm, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)


@torch.no_grad()
def sample_grid(ema: torch.nn.Module, system: ShapesLDM, text_encoder: torch.nn.Module, steps: int) -> Grid:
    """SAMPLE_PROMPTS (seed 0 each) generated with the EMA U-Net and the model's default sampler."""
    train_unet = system.unet
    system.unet = ema
    hook = (ema.register_forward_pre_hook(partial(uncropped_time_ids, factor=system.vae.cfg.downsample_factor),
                                          with_kwargs=True) if ema.add_embedding is not None else None)
    try:
        pipe = system.pipeline(text_encoder)
        images = [pipe.generate(p, seed=0, steps=steps).latents for p in SAMPLE_PROMPTS]
        decoded = system.vae.decode(system.vae.unscale(torch.cat(images)))
    finally:
        system.unet = train_unet
        if hook is not None:
            hook.remove()
    return Grid(decoded, list(SAMPLE_PROMPTS))


def uncropped_time_ids(module: torch.nn.Module, args: tuple, kwargs: dict, factor: int) -> tuple[tuple, dict]:
    """Forward pre-hook giving a micro-conditioned U-Net SDXL's sampling default when its caller
    passes no time_ids: the (h, w) of the canvas as original and target size, crop (0, 0).
    factor: the VAE's, from the latent x (args[0], (B, C, h, w)) to pixels."""
    if kwargs.get("time_ids") is None:
        x = args[0] if args else kwargs["x"]
        h, w = x.shape[-2] * factor, x.shape[-1] * factor
        kwargs = {**kwargs, "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(x.shape[0], 6)}
    return args, kwargs
