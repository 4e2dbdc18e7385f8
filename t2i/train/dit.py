"""Train a DiT on the shapes world's latents with the one training loop: class-conditional on the class of a
one-object scene (`t2i train dit`), and the shared step function that PixArt's text-conditional training
(`t2i.train.pixart`) uses too.

The network works on the latents of a frozen shapes autoencoder (the built-in model's, with its latent
scale), as DiT on the SD VAE's: images -> posterior sample -> DiffusionLoss with the eps target (DDPM's
L_simple, Min-SNR weighting optional) on the DiT's eps half. With `learn_sigma` the network also outputs
the variance half, trained as DiT trains it by IDDPM's hybrid loss L_simple + 0.001 L_vlb (`HybridLoss`);
the families sample the eps half (the variance is dropped at the edge), so it is off by default. The condition
is dropped for a share of the examples (DiT's class dropout to the null class, PixArt's empty caption) so
one network also learns the unconditional model for classifier-free guidance. The EMA network is exported
with the autoencoder as a self-describing `model.safetensors` (`t2i.systems.dit.LatentTransformer`) that
`t2i generate --model` loads, and sampled into captioned grids.

DiT's data: scene i of seed s is the shapes world's "single" scene with its focus object alone; its class
is read from the truth (colour and shape), named as a caption, "a red circle": 40 classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2i.autoencoders.kl import AutoencoderKL
from t2i.data.captions import COLOURS, SHAPES, noun_phrase
from t2i.diffusion.losses import DiffusionLoss, HybridLoss
from t2i.nets.dit import DIT_PRESETS, DiT
from t2i.systems.dit import DiTPipeline, LatentTransformer, LatentTransformerConfig, latent_schedule
from t2i.systems.shapes_ldm import DEFAULT_MODEL_FILE, ShapesLDM
from t2i.train.config import LoopConfig
from t2i.train.distributed import DistInfo
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.loop import batch_indices

CLASSES = [noun_phrase(c, s) for c in COLOURS for s in SHAPES]  # "a red circle", ...: id = 5 * colour + shape


@dataclass
class LatentTrainConfig(LoopConfig):
    """What DiT and PixArt runs share. `model` (the resolved LatentTransformerConfig) is filled in at the
    start and saved in every checkpoint."""

    preset: str = "shapes_s"
    vae_from: str = ""  # a shapes LDM model file whose autoencoder gives the latents ("": the built-in model)
    condition_dropout: float = 0.1  # share of examples without their class / caption (for CFG)
    min_snr_gamma: float = 5.0  # 0: plain MSE
    # DiT and PixArt predict eps; "v_prediction" keeps a signal for x0 at the highest noise levels, where an eps
    # error is amplified into the image's colours (what moved the shapes DDPM and GLIDE runs off mush)
    prediction_type: str = "epsilon"
    learn_sigma: bool = False  # 2C outputs (eps, variance values) trained by the hybrid loss (IDDPM, DiT)
    image_size: int = 64
    background_p: float | None = None  # share of black/gray backgrounds (None: the shapes world's own)
    steps: int = 10000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    export_every: int = 500
    sample_steps: int = 20
    model: dict[str, Any] | None = None


@dataclass
class DiTTrainConfig(LatentTrainConfig):
    background_p: float | None = 0.0  # the class does not say the background: white, unless asked


class SingleObjects:
    """The shapes world's one-object scenes with their classes; scene i of seed s is a pure function of (s, i).

    batch(position, batch_size, info) -> (images (B, 3, S, S) in [-1, 1], class ids (B,) into CLASSES)."""

    def __init__(self, seed: int, size: int, background_p: float) -> None:
        self.seed, self.size, self.background_p = seed, size, background_p

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        from t2i.data.shapes import Scene, render_array, sample_scene, to_tensor

        scene = sample_scene(np.random.default_rng([self.seed, i]), "single", background_p=self.background_p)
        obj = scene.objects[0]  # the focus object; the extras a partial caption leaves out are dropped
        image = render_array(Scene([obj], scene.background, "single", 1), self.size)
        return to_tensor(image), CLASSES.index(noun_phrase(obj.colour, obj.shape))

    def batch(self, position: int, batch_size: int, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.item(i) for i in batch_indices(position, batch_size, info, None, self.seed)]
        return torch.stack([x for x, _ in items]), torch.tensor([c for _, c in items])


def load_autoencoder(path: str) -> AutoencoderKL:
    """The frozen autoencoder (with its latent scale) of a shapes LDM model file ("": the built-in one)."""
    return ShapesLDM.load(path or DEFAULT_MODEL_FILE).vae


def model_config(cfg: LatentTrainConfig, vae: AutoencoderKL, **fields: Any) -> LatentTransformerConfig:
    """The network preset at this image size over this autoencoder, predicting cfg.prediction_type (and the
    variance too with cfg.learn_sigma), and `fields` (labels, text encoder)."""
    if cfg.preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {cfg.preset!r}; choose from {sorted(DIT_PRESETS)}")
    net = dataclasses.replace(DIT_PRESETS[cfg.preset], sample_size=cfg.image_size // vae.cfg.downsample_factor,
                              in_channels=vae.cfg.latent_channels, learn_sigma=cfg.learn_sigma)
    schedule = dataclasses.replace(latent_schedule(), prediction_type=cfg.prediction_type)
    return LatentTransformerConfig(net=net, vae=dataclasses.replace(vae.cfg), image_size=cfg.image_size,
                                   schedule=schedule, **fields)


# (position, generator) -> (images (B, 3, S, S), the network's conditioning), the condition dropped by chance
Batches = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (the EMA network, the autoencoder, the model config) -> a pipeline with generate()
Pipelines = Callable[[DiT, AutoencoderKL, LatentTransformerConfig], Any]


def build_latent_transformer(cfg: LatentTrainConfig, run: Run, name: str, vae: AutoencoderKL,
                             model_cfg: LatentTransformerConfig, batches: Batches, pipeline: Pipelines,
                             prompts: list[str]) -> Task:
    """The step function of a DiT-family network on frozen latents; `name` is the family ("dit", "pixart")
    whose loader reads the exported file."""
    net = DiT(model_cfg.net)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_cls = HybridLoss if model_cfg.net.learn_sigma else DiffusionLoss  # the variance half needs L_vlb
    loss_fn = loss_cls(model_cfg.schedule.alphas_cumprod(), model_cfg.schedule.prediction_type,
                       cfg.min_snr_gamma or None)
    parallel = run.parallel(net)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents (B, C, h, w) (posterior samples from the step's generator) and the conditioning."""
        x, cond = batches(position, gen)
        return vae.scale(vae.encode(x).sample(gen)), cond

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        z, cond = batch
        loss = loss_fn(parallel, z, cond, s.generator)
        gnorm = s.update(loss, opt, net.parameters())
        return {f"{name}/loss": loss.item(), f"{name}/grad_norm": gnorm}

    def export() -> None:
        model = LatentTransformer(model_cfg)
        model.vae.load_state_dict(vae.state_dict())
        model.net.load_state_dict(ema.averaged.state_dict())
        model.save(Path(cfg.out) / "model.safetensors", name)

    @torch.no_grad()
    def grid() -> Grid:
        """`prompts` (seed 0 each) from the EMA network with the model's default sampler."""
        pipe = pipeline(ema.averaged, vae, model_cfg)
        latents = pipe.generate(prompts, seed=0, steps=cfg.sample_steps).sample
        return Grid(vae.decode(vae.unscale(latents)), list(prompts))

    n_params = sum(p.numel() for p in net.parameters())
    about = (f", {model_cfg.net.adaln}-adaLN transformer {n_params / 1e6:.2f}M parameters, "
             f"{model_cfg.net.sample_size}x{model_cfg.net.sample_size} latents (scale {vae.cfg.scaling_factor:.4f})")
    return Task(name, {"net": net, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def build_dit(cfg: DiTTrainConfig, run: Run) -> Task:
    vae = load_autoencoder(cfg.vae_from)
    if cfg.model is None:
        model = model_config(cfg, vae, labels=list(CLASSES))
        model.net.num_classes = len(CLASSES)
        cfg.model = model.to_dict()
    model_cfg = LatentTransformerConfig.from_dict(cfg.model)
    if model_cfg.net.caption_dim:
        raise ValueError(f"--preset {cfg.preset} cross-attends to text: `t2i train pixart` trains it")
    vae.cfg.scaling_factor = model_cfg.vae.scaling_factor
    data = SingleObjects(cfg.seed, cfg.image_size, cfg.background_p or 0.0)
    null = model_cfg.net.num_classes

    def batches(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, labels = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(labels), generator=gen) < cfg.condition_dropout
        return x, {"class_labels": torch.where(drop, null, labels)}  # (B,) the null class for CFG

    def pipeline(net: DiT, vae: AutoencoderKL, c: LatentTransformerConfig) -> nn.Module:
        return DiTPipeline(net, vae, c.schedule, dict(enumerate(c.labels)), name="ema", defaults=c.defaults())

    return build_latent_transformer(cfg, run, "dit", vae, model_cfg, batches, pipeline, CLASSES[::5][:8])


def train_dit(cfg: DiTTrainConfig, resume: bool = False, resume_lr: float | None = None,
              given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a class-conditional DiT training. Returns the exit code."""
    return fit(cfg, build_dit, resume=resume, resume_lr=resume_lr, given=given)
