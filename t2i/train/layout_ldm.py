"""Train the layout renderer: the default model's latent diffusion recipe with a LayoutUNet (issue 17).

The step function for `t2i.train.fit`: a shapes-world scene -> its image, one of its true captions
and its layout from the truth (every object's box, each named by a paraphrased phrase); the frozen
autoencoder's scaled posterior sample is the diffusion target (v-prediction, Min-SNR weighting), the
U-Net reads the caption by cross-attention and the layout as painted maps. Caption and layout are
each dropped 10% of the time, independently, so one network also learns the models guidance needs.
Captions with held-out phrasings (`t2i.data.shapes.phrasings`) and the judge's prompts never appear.
A warm start from the default model (`--init-from`) copies its autoencoder and U-Net; the layout
input starts at zero, so training begins from the text-only model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i.data.shapes.datasets import default_exclude, to_tensor
from t2i.data.shapes.layouts import layout_example
from t2i.data.shapes.rendering import render_array
from t2i.data.shapes.sampling import BACKGROUND_P
from t2i.diffusion.losses import DecodedLoss, DiffusionLoss
from t2i.layout.spec import Layout
from t2i.nets.layout_unet import LayoutConfig
from t2i.systems.shapes_layout import (
    PhraseEncoder,
    ShapesLayoutConfig,
    ShapesLayoutModel,
    ShapesLayoutPipeline,
    encode_layouts,
    is_layout_model,
)
from t2i.systems.shapes_ldm import ShapesLDM, load_text_encoder
from t2i.train.autoencoder import load_vae
from t2i.train.checkpoint import tensors_sha256
from t2i.train.config import LoopConfig
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS
from t2i.train.loop import batch_indices


@dataclass
class LayoutLDMTrainConfig(LoopConfig):
    """One renderer run, warm-started from a shapes LDM file (the default model)."""

    # a ShapesLDM model.safetensors (autoencoder, U-Net, schedule, defaults), or a layout renderer's
    # own model.safetensors to continue from (its config and every weight)
    init_from: str = ""
    # another autoencoder (a `t2i train autoencoder` vae.safetensors) in place of the init's: the U-Net
    # is still warm-started, but learns a new latent space, whose scale is measured at the start
    vae: str = ""
    phrase_channels: int = 8
    # Half the captions dropped: with the caption, the U-Net can take an object's colour from
    # cross-attention and never learn it from the box's phrase, and then binds colours as badly as
    # the text-only model (measured at step 2,000 with 10%: a box's colour followed the caption).
    caption_dropout: float = 0.5
    # Train on the layout's complete caption (every object and the background, `layout_caption`)
    # instead of a partial true caption: the caption then never disagrees with the boxes, and the
    # pipeline rewrites the user's prompt the same way (model config `recaption`).
    recaption: bool = False
    layout_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # lambda of the L1 loss through the frozen decoder (t2i.diffusion.losses.DecodedLoss; 0: off): the
    # latent loss barely sees colours the decoder tells apart by small latent differences (dark scenes)
    pixel_weight: float = 0.0
    pixel_batch: int = 8  # samples of each batch decoded for it (the least noisy)
    background_p: float = BACKGROUND_P
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    layout_lr_scale: float = 5.0  # the layout input layers (new, zero-initialised) learn this much faster
    ema_decay: float = 0.999
    export_every: int = 200
    sample_steps: int = 20
    model: dict[str, Any] | None = None  # the resolved ShapesLayoutConfig
    # digest of the frozen autoencoder's tensors at the start: a resume whose --vae or init file has
    # changed on disk since would go on in another latent space without a word
    vae_sha256: str = ""


def layout_batch(seed: int, indices: list[int], background_p: float,
                 recaption: bool = False) -> tuple[torch.Tensor, list[str], list[Layout]]:
    """Images (B, 3, 64, 64) in [-1, 1], captions and layouts of the examples at `indices`."""
    exclude = default_exclude()
    examples = [layout_example(seed, i, exclude, background_p, recaption=recaption) for i in indices]
    images = torch.stack([to_tensor(render_array(scene)) for scene, _, _ in examples])
    return images, [c for _, c, _ in examples], [lay for _, _, lay in examples]


@torch.no_grad()
def layout_latent_scale(vae: torch.nn.Module, seed: int, background_p: float, n: int = 256) -> float:
    """LDM's scaling factor of a new autoencoder, measured on the renderer's own training scenes:
    1 / std of the posterior samples of the first n (the U-Net trains on unit-variance latents)."""
    gen = torch.Generator().manual_seed(0)
    zs = [vae.encode(layout_batch(seed, list(range(i, i + 32)), background_p)[0]).sample(gen).flatten()
          for i in range(0, n, 32)]
    return float(1.0 / torch.cat(zs).std())


def build_layout_ldm(cfg: LayoutLDMTrainConfig, run: Run) -> Task:
    init: ShapesLDM | ShapesLayoutModel = (ShapesLayoutModel.load(cfg.init_from) if is_layout_model(cfg.init_from)
                                           else ShapesLDM.load(cfg.init_from))
    first_stage = load_vae(cfg.vae) if cfg.vae else init.vae
    if cfg.model is None:  # a new run: its model config is resolved once, then saved with its checkpoints
        model_cfg = (init.cfg if isinstance(init, ShapesLayoutModel) else ShapesLayoutConfig(
            ldm=init.cfg, layout=LayoutConfig(phrase_channels=cfg.phrase_channels,
                                              fold=init.cfg.vae.downsample_factor)))
        if cfg.vae:
            if first_stage.cfg.latent_channels != model_cfg.ldm.vae.latent_channels:
                raise ValueError(f"--vae {cfg.vae}: {first_stage.cfg.latent_channels} latent channels, but the "
                                 f"U-Net of {cfg.init_from} takes {model_cfg.ldm.vae.latent_channels}")
            if first_stage.cfg.downsample_factor != model_cfg.ldm.vae.downsample_factor:  # the layout maps' fold
                raise ValueError(f"--vae {cfg.vae}: factor {first_stage.cfg.downsample_factor}, but the renderer of "
                                 f"{cfg.init_from} reads layouts at factor {model_cfg.ldm.vae.downsample_factor}")
            model_cfg.ldm.vae = dataclasses.replace(first_stage.cfg, scaling_factor=layout_latent_scale(
                first_stage, cfg.seed, cfg.background_p))
        cfg.model = model_cfg.to_dict()
        cfg.vae_sha256 = tensors_sha256(first_stage.state_dict())
    elif cfg.vae_sha256 and tensors_sha256(first_stage.state_dict()) != cfg.vae_sha256:
        raise ValueError(f"{cfg.vae or cfg.init_from}: its autoencoder is not the one this run started with "
                         "(the file changed since); restore it, or start a new run")
    model_cfg = ShapesLayoutConfig.from_dict(cfg.model)
    model_cfg.recaption = cfg.recaption
    cfg.model = model_cfg.to_dict()
    system = ShapesLayoutModel(model_cfg)
    system.vae.load_state_dict(first_stage.state_dict())
    system.vae.requires_grad_(False).eval()
    vae, unet = system.vae, system.unet
    unet.load_state_dict(init.unet.state_dict(), strict=False)  # from a text-only U-Net the layout input stays zero
    text = load_text_encoder(model_cfg.ldm)
    phrases = PhraseEncoder(text)
    ema = EMA(unet, cfg.ema_decay)
    layout_params = [*unet.phrase_proj.parameters(), *unet.layout_in.parameters()]
    rest = [p for p in unet.parameters() if all(p is not q for q in layout_params)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": layout_params, "lr_scale": cfg.layout_lr_scale}],
                            lr=cfg.lr, weight_decay=0.0)
    schedule = model_cfg.ldm.schedule
    if cfg.pixel_weight:
        loss_fn: DiffusionLoss = DecodedLoss(schedule.alphas_cumprod(), schedule.prediction_type,
                                             cfg.min_snr_gamma or None, lambda z: vae.decode(vae.unscale(z)),
                                             cfg.pixel_weight, cfg.pixel_batch)
    else:
        loss_fn = DiffusionLoss(schedule.alphas_cumprod(), schedule.prediction_type, cfg.min_snr_gamma or None)
    net = run.parallel(unet)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        idx = batch_indices(position, cfg.batch_size, run.info, None, cfg.seed)
        x, captions, layouts = layout_batch(cfg.seed, idx, cfg.background_p, cfg.recaption)
        drop_text = (torch.rand(len(captions), generator=gen) < cfg.caption_dropout).tolist()
        drop_layout = torch.rand(len(captions), generator=gen) < cfg.layout_dropout
        captions = ["" if d else c for c, d in zip(captions, drop_text, strict=True)]
        layout = encode_layouts(layouts, phrases, model_cfg.max_objects)
        layout[drop_layout] = 0.0  # every object invalid: the model without a layout
        z = vae.scale(vae.encode(x).sample(gen))  # (B, 4, 16, 16)
        return z, {"context": text.encode(captions).context.float(), "layout": layout}, x

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor], s: Step) -> dict[str, float]:
        z, cond, x = batch
        loss = (loss_fn(net, z, cond, s.generator, pixels=x) if isinstance(loss_fn, DecodedLoss)
                else loss_fn(net, z, cond, s.generator))
        gnorm = s.update(loss, opt, unet.parameters())
        return {"layout_ldm/loss": loss.item(), "layout_ldm/grad_norm": gnorm}

    def shipped() -> ShapesLayoutModel:
        out = ShapesLayoutModel(model_cfg)
        out.vae.load_state_dict(vae.state_dict())
        out.unet.load_state_dict(ema.averaged.state_dict())
        return out

    def export() -> None:
        shipped().save(Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS drawn on their layouts from scenes of a held-back seed."""
        pipe = ShapesLayoutPipeline(shipped().eval(), text)
        rng = np.random.default_rng(cfg.seed + 1)
        images = []
        for i, _ in enumerate(SAMPLE_PROMPTS):
            _, caption, layout = layout_example(cfg.seed + 1, int(rng.integers(1 << 30)) + i, default_exclude())
            images.append(pipe.generate(caption, seed=0, steps=cfg.sample_steps, layout=layout).images[0])
        pixels = torch.stack([to_tensor(np.array(im)) for im in images])
        return Grid(pixels, [im.info["parameters"].split("\n")[0] for im in images])

    n_params = sum(p.numel() for p in unet.parameters())
    return Task("layout_ldm", {"unet": unet, "ema": ema.averaged}, {"opt": opt}, prepare=prepare, step=step,
                ema=ema, grid=grid, export=export,
                about=f", layout U-Net {n_params / 1e6:.2f}M parameters, warm start from {cfg.init_from}")


def train_layout_ldm(cfg: LayoutLDMTrainConfig, resume: bool = False, resume_lr: float | None = None,
                     given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a layout renderer training. Returns the exit code."""
    return fit(cfg, build_layout_ldm, resume=resume, resume_lr=resume_lr, given=given)

