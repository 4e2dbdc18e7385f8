"""Train the latent diffusion U-Net on a frozen autoencoder and a frozen text encoder.

The loop of DiT's train.py with SD's conditioning: images -> posterior sample of the
frozen VAE (scaled) -> DiffusionLoss (eps or v, Min-SNR weighting) on the U-Net with
cross-attention to MiniLM token states (the step's captions encoded as one batch), 10% of captions replaced
by the empty caption so one network also learns the unconditional model for CFG, AdamW
with linear warm-up, gradient clipping, EMA weights. The EMA model is exported as a
self-describing `model.safetensors` (`t2i.systems.shapes_ldm.ShapesLDM`) and sampled into
PNG grids along the way.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from t2i.diffusion.losses import DiffusionLoss
from t2i.systems.shapes_ldm import UNET_PRESETS, ShapesLDM, ShapesLDMConfig, load_text_encoder
from t2i.train.autoencoder import load_vae
from t2i.train.checkpoint import restore, resume_run, save_and_prune
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo, broadcast_flag, init_distributed
from t2i.train.ema import ema_decay, make_ema, update_ema
from t2i.train.loop import (
    RunLog,
    StopSignal,
    check_finite_loss,
    finish_run,
    save_grid,
    set_lr,
    step_generator,
    warmup_lr,
)

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
class LDMTrainConfig:
    """One latent diffusion run. `model` is filled in from the presets and the VAE file at the
    start of the run (with the latent scaling factor measured) and saved in every checkpoint."""

    out: str
    vae_path: str
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
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    seed: int = 0
    log_every: int = 25
    image_every: int = 250  # sample grids; 0: none
    ckpt_every: int = 250
    export_every: int = 500
    keep: int = 2
    sample_steps: int = 20
    # Warm start from a shipped model file (ShapesLDM): its config, autoencoder and U-Net (as both the
    # trained and the EMA weights; the optimizer starts afresh). How training continues across
    # machines that keep nothing but the repository. vae_path may then be empty.
    init_from: str | None = None
    model: dict[str, Any] | None = None  # the resolved ShapesLDMConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LDMTrainConfig:
        return cls(**d)


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, data, n: int = 256, batch: int = 32) -> float:
    """1 / std of posterior samples of the first n items (LDM's scaling factor: the latents the
    U-Net trains on, which are posterior samples, get unit variance)."""
    zs, gen = [], torch.Generator().manual_seed(0)
    for pos in range(0, n, batch):
        x, _, _ = data.batch(pos, batch, DistInfo())
        zs.append(vae.encode(x).sample(gen))
    return float(1.0 / torch.cat(zs).std())


def resolve_model_config(cfg: LDMTrainConfig, vae: torch.nn.Module, data) -> ShapesLDMConfig:
    unet_cfg = dataclasses.replace(UNET_PRESETS[cfg.unet_preset])
    model_cfg = ShapesLDMConfig(vae=dataclasses.replace(vae.cfg), unet=unet_cfg, image_size=cfg.image_size)
    model_cfg.schedule.prediction_type = cfg.prediction_type
    model_cfg.vae.scaling_factor = latent_scale(vae, data)
    model_cfg.unet.sample_size = cfg.image_size // model_cfg.vae.downsample_factor
    return model_cfg


def train_ldm(cfg: LDMTrainConfig, resume: bool = False, resume_lr: float | None = None,
              text_encoder: torch.nn.Module | None = None) -> int:
    """Run (or, with resume, continue) a latent diffusion training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding; default the config's MiniLM.
    """
    info = init_distributed()
    out = Path(cfg.out)
    cfg, ckpt = resume_run(cfg, resume, lr=resume_lr)
    torch.manual_seed(cfg.seed)
    init = ShapesLDM.load(cfg.init_from) if cfg.init_from else None
    vae = init.vae if init is not None else load_vae(cfg.vae_path)
    log = RunLog(out, info, 0, cfg.steps)
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, log.text, cfg.background_p)
    if cfg.model is None:
        cfg.model = (init.cfg if init is not None else resolve_model_config(cfg, vae, data)).to_dict()
    model_cfg = ShapesLDMConfig.from_dict(cfg.model)
    vae.cfg.scaling_factor = model_cfg.vae.scaling_factor
    text = text_encoder or load_text_encoder(model_cfg)

    system = ShapesLDM(model_cfg)  # holds the U-Net being trained and the frozen VAE it samples with
    system.vae.load_state_dict(vae.state_dict())
    system.vae.requires_grad_(False).eval()
    unet = system.unet
    if init is not None:
        unet.load_state_dict(init.unet.state_dict())
    ema = make_ema(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    modules, optimizers = {"unet": unet, "ema": ema}, {"opt": opt}
    step, position = restore(ckpt, modules, optimizers)
    log.resumed_at(step)
    n_params = sum(p.numel() for p in unet.parameters())
    log.text(f"ldm run {out}: step {step}/{cfg.steps}, U-Net {n_params / 1e6:.2f}M parameters, latent scale "
             f"{model_cfg.vae.scaling_factor:.4f}" + (f", resumed from {ckpt}" if ckpt else "")
             + (f", warm start from {cfg.init_from}" if init is not None and ckpt is None else ""))
    loss_fn = DiffusionLoss(model_cfg.schedule.alphas_cumprod(), cfg.prediction_type, cfg.min_snr_gamma or None)
    net = DDP(unet) if info.enabled else unet
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def save() -> None:
        if info.is_main:
            save_and_prune(out, cfg, step=step, data_position=position, modules=modules, optimizers=optimizers)

    def export() -> None:
        if info.is_main:
            shipped = ShapesLDM(model_cfg)
            shipped.vae.load_state_dict(vae.state_dict())
            shipped.unet.load_state_dict(ema.state_dict())
            shipped.save(out / "model.safetensors")

    @torch.no_grad()
    def prepare(step: int, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Everything frozen for one step: latents (B, 4, h, w), context (B, T, 384), and the step's
        generator, already advanced past the caption dropout and posterior draws."""
        x, captions, _ = data.batch(position, cfg.batch_size, info)
        gen = step_generator(cfg.seed, step, info.rank)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        z = vae.scale(vae.encode(x).sample(gen))  # (B, 4, h, w) diffusion latents
        # One batched call per step (not per caption, not cached): 3x cheaper than single captions,
        # and a step's batch is fixed by its position, so a resumed run sees the same numbers.
        return z, text.encode(captions).context.float(), gen

    # The next step's frozen work runs in a thread while this step trains (torch releases the GIL),
    # so with --threads 1 a second core is used. Results are the same as computing it in line.
    prefetch = ThreadPoolExecutor(1)
    t_data = t_step = 0.0
    with StopSignal() as stop:
        pending = prefetch.submit(prepare, step, position)
        while step < cfg.steps:
            t0 = time.perf_counter()
            z, context, gen = pending.result()
            if step + 1 < cfg.steps:
                pending = prefetch.submit(prepare, step + 1, position + cfg.batch_size * info.world_size)
            t1 = time.perf_counter()
            lr = warmup_lr(step, cfg.lr, cfg.warmup)
            set_lr(opt, lr)
            with autocast:
                loss = loss_fn(net, z, {"context": context}, gen)
            check_finite_loss(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            check_finite_loss(gnorm, step, "gradient norm")
            opt.step()
            update_ema(ema, unet, ema_decay(step, cfg.ema_decay))
            position += cfg.batch_size * info.world_size
            step += 1
            t_data, t_step = t_data + t1 - t0, t_step + time.perf_counter() - t1
            log.advance({"loss": loss.item()})
            if step % cfg.log_every == 0:
                log.scalars(step, {"ldm/loss": loss.item(), "ldm/grad_norm": gnorm.item(), "lr": lr,
                                   "time/data_s": t_data / cfg.log_every, "time/step_s": t_step / cfg.log_every})
                t_data = t_step = 0.0
            if info.is_main and cfg.image_every > 0 and (step % cfg.image_every == 0 or step == cfg.steps):
                sample_grid(ema, system, text, out / "samples" / f"samples_{step:08d}.png", cfg.sample_steps)
            stopping = broadcast_flag(stop.signum is not None, info)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                save()
            if step % cfg.export_every == 0 or step == cfg.steps or stopping:
                export()
            if stopping:
                log.text(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                break
    prefetch.shutdown(cancel_futures=True)
    return finish_run(log, stop, step, info)


@torch.no_grad()
def sample_grid(ema: torch.nn.Module, system: ShapesLDM, text_encoder: torch.nn.Module, path: Path,
                steps: int) -> None:
    """Generate SAMPLE_PROMPTS (seed 0 each) with the EMA U-Net and the model's default sampler."""
    train_unet = system.unet
    system.unet = ema
    try:
        pipe = system.pipeline(text_encoder)
        images = [pipe.generate(p, seed=0, steps=steps).latents for p in SAMPLE_PROMPTS]
        decoded = system.vae.decode(system.vae.unscale(torch.cat(images)))
    finally:
        system.unet = train_unet
    save_grid(decoded, path, nrow=8)
