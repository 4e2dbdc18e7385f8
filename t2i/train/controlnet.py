"""Train a ControlNet on a frozen model with the one training loop (`t2i train controlnet --base MODEL`).

The conditioning image is the shapes world's box map (`t2i.adapters.controlnet.box_map`: each object's
bounding box from the scene truth, filled white on black, at the image size). The family of the base model
decides the network (`FAMILIES`):
- a U-Net model (the shapes LDM, `t2i-shapes`; SD): Zhang et al.'s ControlNet, a trainable copy of the
  U-Net's encoder with zero convolutions (`t2i.nets.controlnet`), reading the box map in [0, 1] through
  its small conditioning embedding;
- PixArt: PixArt-delta's ControlNet-Transformer, trainable copies of the first N blocks with zero linear
  layers (`t2i.nets.pixart_controlnet`), reading the box map VAE-encoded like the image.
Both start as the base network (copies of its weights, zero projections) and only they train.

The step is the latent model's (`t2i.train.ldm`): images -> posterior sample of the frozen VAE (scaled)
-> DiffusionLoss (the base's prediction type, Min-SNR weighting) on the base network with the ControlNet's
residuals added; the captions go through the base pipeline's own `encode_prompts`, so the network is
trained on exactly the conditioning it samples with; 10% of captions dropped to the empty caption (the
unconditional branch of CFG also gets the box map, as at sampling). No EMA (the ControlNet paper trains
without one). The trained network is exported as `OUT/controlnet.safetensors`, which `t2i generate
--controlnet` and `t2i eval shapes --layouts truth --controlnet` read; resumable as every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.adapters.controlnet import box_map, save_controlnet
from t2i.diffusion.losses import DiffusionLoss
from t2i.diffusion.precond import LearnedVariance
from t2i.imageio import from_pil, to_pil
from t2i.nets.controlnet import ControlNet
from t2i.nets.pixart_controlnet import PixArtControlNet
from t2i.train.config import LoopConfig
from t2i.train.distributed import DistInfo
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.loop import batch_indices

GRID_SCENES = 4  # sample grid: this many held-aside scenes, each as (box map, sample)


@dataclass
class ControlNetTrainConfig(LoopConfig):
    base: str = ""  # the frozen model: a name (`t2i models`) or a path
    blocks: int = 0  # PixArt: copies of the first N blocks (0: half of them, as PixArt-delta's 13 of 28)
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # 0: plain MSE
    background_p: float | None = None  # share of black/gray backgrounds (None: the shapes world's own)
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-4  # the base's own rate (on t2i-shapes, 150 steps at it: stable, the boxes already pull)
    weight_decay: float = 0.0
    export_every: int = 250
    sample_steps: int = 20


class BoxMapScenes:
    """The shapes world with each scene's box map: scene i of seed s (its training caption, the judge's
    held-out prompts never shown) is a pure function of (s, i).

    batch(position, batch_size, info) -> (images (B, 3, S, S) in [-1, 1], captions, box maps (B, 3, S, S)
    in [0, 1])."""

    def __init__(self, seed: int, size: int, background_p: float | None) -> None:
        self.seed, self.size, self.background_p = seed, size, background_p

    def item(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        from t2i.data.shapes import BACKGROUND_P, render_array, shapes_example, to_tensor
        from t2i.data.shapes.layouts import scene_layout

        p = BACKGROUND_P if self.background_p is None else self.background_p
        scene, caption = shapes_example(self.seed, i, background_p=p)
        boxes = torch.from_numpy(box_map(scene_layout(scene), self.size, self.size)).permute(2, 0, 1).float() / 255
        return to_tensor(render_array(scene, self.size)), caption, boxes

    def batch(self, position: int, batch_size: int, info: DistInfo) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        items = [self.item(i) for i in batch_indices(position, batch_size, info, None, self.seed)]
        return torch.stack([x for x, _, _ in items]), [c for _, c, _ in items], torch.stack([m for _, _, m in items])


# (base pipeline, run config) -> (a new ControlNet on its network, box maps (B, 3, H, W) in [0, 1] -> its input)
Kind = Callable[[Any, ControlNetTrainConfig], tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]


def unet_controlnet(pipe: Any, cfg: ControlNetTrainConfig) -> tuple[ControlNet, Callable]:
    """A copy of the U-Net's encoder; its conditioning embedding halves the box map down to the latent size
    (widths 16, 32, 96, 256 as SD's, as many as the autoencoder's factor needs)."""
    if cfg.blocks:
        raise ValueError(f"--blocks counts a PixArt network's copied blocks; a U-Net ControlNet ({pipe.family}) copies "
                         "the whole encoder")
    halvings = int(math.log2(pipe.vae_scale))
    return ControlNet.from_unet(pipe.unet, 3, (16, 32, 96, 256, 256)[:halvings + 1]), lambda maps: maps


def pixart_controlnet(pipe: Any, cfg: ControlNetTrainConfig) -> tuple[PixArtControlNet, Callable]:
    """Copies of the first N blocks; the box map is VAE-encoded (posterior mode, scaled) as generation does."""
    blocks = cfg.blocks or max(1, pipe.unet.cfg.layers // 2)
    vae = pipe.vae
    return PixArtControlNet.from_dit(pipe.unet, blocks), lambda maps: vae.scale(vae.encode(maps * 2 - 1).mode())


FAMILIES: dict[str, Kind] = {"shapes_ldm": unet_controlnet, "stable_diffusion": unet_controlnet,
                             "pixart": pixart_controlnet}


def controlled(controlnet: nn.Module, base: nn.Module) -> Callable[..., torch.Tensor]:
    """model(x, t, control=(B, ...), **cond): the base network with the ControlNet's residuals for the batch's
    control input (what the loss calls; a learned variance's eps half, as the PixArt pipeline samples)."""

    def model(x: torch.Tensor, t: torch.Tensor, control: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        net = controlnet.controlling(base, base, control)
        return LearnedVariance(net)(x, t, **cond) if getattr(base.cfg, "learn_sigma", False) else net(x, t, **cond)

    return model


def load_base(name: str) -> Any:
    """The frozen base pipeline (float32) and a check that its family has a ControlNet here."""
    import t2i
    from t2i.systems.registry import resolve

    if not name:
        raise ValueError("t2i train controlnet needs --base (the frozen model: a name or a path)")
    family = resolve(name)[0].name
    if family not in FAMILIES:
        raise ValueError(f"t2i train controlnet: no ControlNet for the {family} family (it trains on "
                         f"{', '.join(FAMILIES)})")
    return t2i.load(name, precision="fp32")


def build_controlnet(cfg: ControlNetTrainConfig, run: Run) -> Task:
    pipe = load_base(cfg.base)
    controlnet, control_input = FAMILIES[pipe.family](pipe, cfg)
    controlnet.train().requires_grad_(True)
    base, vae = pipe.unet, pipe.vae
    size = pipe.defaults.width
    data = BoxMapScenes(cfg.seed, size, cfg.background_p)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiffusionLoss(pipe.schedule.alphas_cumprod(), pipe.schedule.prediction_type, cfg.min_snr_gamma or None)

    model = controlled(controlnet, base)
    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents (B, C, h, w), the text conditioning as the pipeline encodes it, and the control input;
        the caption dropout and the posterior samples from the step's generator."""
        x, captions, maps = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        z = vae.scale(vae.encode(x).sample(gen))  # (B, C, h, w) diffusion latents
        cond, _, _ = pipe.encode_prompts(captions, [""] * len(captions), size, size, False)
        return z, {**cond, "control": control_input(maps)}

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        z, cond = batch
        loss = loss_fn(model, z, cond, s.generator)
        params = list(controlnet.parameters())
        gnorm = s.update(loss, opt, params, average=params)  # every rank's gradients (no DDP module: hooks)
        return {"controlnet/loss": loss.item(), "controlnet/grad_norm": gnorm}

    def export() -> None:
        save_controlnet(controlnet, Path(cfg.out) / "controlnet.safetensors", base=cfg.base)

    @torch.no_grad()
    def grid() -> Grid:
        """GRID_SCENES scenes of another seed than training's: each box map, then the base model drawing its
        caption with the ControlNet (seed 0)."""
        scenes = BoxMapScenes(cfg.seed + 1, size, cfg.background_p)
        images, captions = [], []
        for i in range(GRID_SCENES):
            _, caption, boxes = scenes.item(i)
            control = to_pil(boxes[None] * 2 - 1)[0]
            sample = pipe.generate(caption, seed=0, steps=cfg.sample_steps, controlnet=controlnet,
                                   control_image=control).images[0]
            images += [boxes * 2 - 1, from_pil(sample)[0]]
            captions += ["box map", caption]
        return Grid(torch.stack(images), captions, nrow=2 * GRID_SCENES)

    n_params = sum(p.numel() for p in controlnet.parameters())
    about = f", {type(controlnet).__name__} {n_params / 1e6:.2f}M parameters on {cfg.base} ({pipe.family})"
    return Task("controlnet", {"controlnet": controlnet}, {"opt": opt}, prepare=prepare, step=step,
                grid=grid, export=export, about=about)


def train_controlnet(cfg: ControlNetTrainConfig, resume: bool = False, resume_lr: float | None = None,
                     given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a ControlNet training. Returns the exit code."""
    return fit(cfg, build_controlnet, resume=resume, resume_lr=resume_lr, given=given)
