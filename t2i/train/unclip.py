"""Train unCLIP on the shapes world with our shapes CLIP (`t2i train unclip-prior`, `t2i train unclip-decoder`).

Both on the one training loop, both write the whole family file (`t2i.systems.unclip`: prior, text projection,
decoder; the part not trained comes from `init`, another unCLIP file, or stays random):

- the **prior** (unCLIP sec. 2.2): CLIP image embeddings z_i of the training images, normalised by their
  mean and standard deviation (measured on `stats_images` images at the start, stored with the prior), are
  noised on the cosine schedule and the transformer regresses z_i itself, L = ||f(z_t, t, y) - z_i||^2
  (DiffusionLoss with the "sample" target), the text dropped (the empty caption) 10% of the time for
  classifier-free guidance; or, with `prior="ar"`, the paper's autoregressive prior (`t2i.nets.ar_prior`): the
  PCA basis, the components' scales and the dot products' range measured on the same `stats_images` images,
  each z_i quantized into codes and predicted one after the other (cross-entropy, teacher forcing) after the
  token of its quantized dot product with the caption's z_t (the null token where the caption is dropped);
- the **decoder** (sec. 2.1): the images at the decoder's size, conditioned on their own CLIP image embedding
  (projected into the time embedding and four context tokens) and caption; the image embedding replaced by the
  learned null embedding 10% of the time and the caption by the empty one 50% of the time, as the paper; it
  learns its variance (IDDPM's hybrid loss, L_simple + 0.001 L_vlb), its mean as v (default) or eps (Karlo's).

The CLIP is frozen and its embeddings are computed in `prepare` (no autograd). The EMA nets are exported as
`model.safetensors` and sampled into captioned grids through the family's pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.checkpoints.diffusers_unclip import UnCLIPSchedulerConfig
from t2i.checkpoints.io import load_state_dict, read_config
from t2i.diffusion.losses import DiffusionLoss, HybridLoss
from t2i.nets.ar_prior import AR_PRIOR_PRESETS, ARPrior, cosine
from t2i.nets.prior_transformer import PRIOR_PRESETS
from t2i.nets.unclip_unet import UNCLIP_UNET_PRESETS, TextProj, TextProjConfig, UnCLIPUNet
from t2i.systems.unclip import (
    SYSTEM_NAME,
    StageSettings,
    UnCLIPConfig,
    UnCLIPNets,
    load_clip,
    pipeline_from_nets,
    save_unclip,
)
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS

PARTS = ("prior", "decoder")
PRIOR_KINDS = ("diffusion", "ar")


@dataclass
class UnCLIPTrainConfig(LoopConfig):
    """One unCLIP run: `train` names the part trained ("prior" or "decoder"); `init` an unCLIP file whose
    weights start the nets (the prior run's output for a decoder run). `model` (the resolved UnCLIPConfig)
    is filled in at the start and saved in every checkpoint."""

    train: str = "prior"
    init: str | None = None
    prior: str = "diffusion"  # the prior's kind: "diffusion" (the paper's choice) or "ar" (its alternative)
    prior_preset: str = "shapes_s"  # in PRIOR_PRESETS (diffusion) or AR_PRIOR_PRESETS (ar)
    decoder_preset: str = "shapes_decoder_32"
    image_size: int = 32  # the decoder's
    clip_size: int = 64  # the shapes CLIP's input side (the images are drawn at it, then reduced)
    text_dropout: float = 0.1  # prior: the caption dropped
    image_dropout: float = 0.1  # decoder: the image embedding replaced by the null one
    caption_dropout: float = 0.5  # decoder: the caption dropped
    # The decoder's target. Karlo's is eps; on the cosine schedule eps teaches nothing at the terminal SNR (2.4e-9)
    # and the pixel DDPM trained that way drew dark mush, where v-prediction learned (docs/FAMILIES.md).
    prediction_type: str = "v_prediction"
    stats_images: int = 1024
    data: str = "shapes"
    data_path: str | None = None
    background_p: float | None = None
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    export_every: int = 500
    sample_steps: int = 25
    model: dict[str, Any] | None = None


def resolve_model_config(cfg: UnCLIPTrainConfig, clip: nn.Module) -> UnCLIPConfig:
    """The nets of the presets, the prior's widths and text length those of the CLIP."""
    if cfg.prior not in PRIOR_KINDS:
        raise ValueError(f"prior is one of {PRIOR_KINDS}, got {cfg.prior!r}")
    ar = cfg.prior == "ar"
    for name, preset, table in (("prior", cfg.prior_preset, AR_PRIOR_PRESETS if ar else PRIOR_PRESETS),
                                ("decoder", cfg.decoder_preset, UNCLIP_UNET_PRESETS)):
        if preset not in table:
            raise ValueError(f"unknown {cfg.prior + ' ' if name == 'prior' else ''}{name} preset {preset!r}; "
                             f"choose from {sorted(table)}")
    widths = {"embed_dim": clip.embed_dim, "text_tokens": clip.text_tokens}
    prior = None if ar else dataclasses.replace(PRIOR_PRESETS[cfg.prior_preset], **widths)
    ar_prior = dataclasses.replace(AR_PRIOR_PRESETS[cfg.prior_preset], embed_dim=clip.embed_dim) if ar else None
    decoder = dataclasses.replace(UNCLIP_UNET_PRESETS[cfg.decoder_preset], sample_size=cfg.image_size)
    proj = TextProjConfig(extra_tokens=4, embed_dim=clip.embed_dim, time_embed_dim=decoder.time_embed_dim,
                          context_dim=decoder.context_dim or 64)
    # the exported model keeps the closer of two prior samples to the text (unCLIP sec. 2.2)
    own = UnCLIPConfig(prior=prior, ar_prior=ar_prior, text_proj=proj, decoder=decoder,
                       decoder_schedule=UnCLIPSchedulerConfig(variance_type="learned_range",
                                                              prediction_type=cfg.prediction_type),
                       settings=StageSettings(prior_steps=cfg.sample_steps, prior_candidates=2))
    if cfg.init is None:
        return own
    # the part not trained here is the init file's, shape included
    base = UnCLIPConfig.from_dict(read_config(cfg.init, "an unCLIP model file", SYSTEM_NAME))
    if cfg.train == "prior":
        return dataclasses.replace(base, prior=own.prior, ar_prior=own.ar_prior)
    return dataclasses.replace(base, text_proj=own.text_proj, decoder=own.decoder,
                               decoder_schedule=own.decoder_schedule)


def trained_prefixes(part: str) -> tuple[str, ...]:
    """The state-dict prefixes of the nets a run of `part` trains (the rest come from its init file)."""
    return ("prior.",) if part == "prior" else ("text_proj.", "decoder.")


def load_init(nets: UnCLIPNets, path: str, part: str) -> None:
    """The init file's weights for every net this run does not train (strict for those)."""
    trained = trained_prefixes(part)
    state = {k: v for k, v in load_state_dict(path).items() if not k.startswith(trained)}
    result = nets.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(trained)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: not the unCLIP nets this run needs (missing {missing[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]})")


class DecoderWithProjection(nn.Module):
    """The decoder as the loss sees it: text_proj then the U-Net, the null image embedding where `drop_image`."""

    def __init__(self, text_proj: TextProj, decoder: UnCLIPUNet) -> None:
        super().__init__()
        self.text_proj, self.decoder = text_proj, decoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, image_embeds: torch.Tensor, drop_image: torch.Tensor,
                text_embeds: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        null = self.text_proj.null_image(image_embeds.shape[0])
        image = torch.where(drop_image[:, None], null, image_embeds)  # (B, E)
        return self.decoder(x, t, **self.text_proj(image, text_embeds, text_states, text_mask))


@torch.no_grad()
def set_embedding_statistics(nets: UnCLIPNets, embeds: torch.Tensor) -> None:
    """The prior's normalisation: per-dimension mean and standard deviation of CLIP image embeddings (N, E)."""
    nets.prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
    nets.prior.clip_std.copy_(embeds.std(0, keepdim=True).clamp(min=1e-4))


def build_unclip(cfg: UnCLIPTrainConfig, run: Run, clip: nn.Module | None = None) -> Task:
    if cfg.train not in PARTS:
        raise ValueError(f"train is one of {PARTS}, got {cfg.train!r}")
    fresh = cfg.model is None
    clip = clip or load_clip(UnCLIPConfig.clip if fresh else cfg.model["clip"]).eval().requires_grad_(False)
    if fresh:
        cfg.model = dataclasses.asdict(resolve_model_config(cfg, clip))
    model_cfg = UnCLIPConfig.from_dict(cfg.model)
    data = open_data(cfg.data, cfg.data_path, cfg.clip_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    nets = UnCLIPNets(model_cfg)
    if cfg.init is not None:
        load_init(nets, cfg.init, cfg.train)
    prior_on = cfg.train == "prior"
    ar = isinstance(nets.prior, ARPrior)
    if prior_on and fresh:  # (a resumed run reads them back from its checkpoint)
        images, captions, _ = data.batch(10**9, cfg.stats_images, run.info)  # far from the training positions
        with torch.no_grad():
            z = clip.encode_pixels(images)
            if ar:
                nets.prior.quantizer.fit(z, clip.encode_text(captions).embeds)
            else:
                set_embedding_statistics(nets, z)
    nets.requires_grad_(False)
    trained = nets.prior if prior_on else nn.ModuleList([nets.text_proj, nets.decoder])
    trained.requires_grad_(True)
    if not ar:  # the diffusion prior's statistics are parameters (diffusers' layout), never trained
        nets.prior.clip_mean.requires_grad_(False)
        nets.prior.clip_std.requires_grad_(False)
    params = [p for p in nets.parameters() if p.requires_grad]
    ema = EMA(nets, cfg.ema_decay)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn: Any = None  # the autoregressive prior's cross-entropy is written in `step`
    if prior_on:
        net = run.parallel(nets.prior)
        if not ar:
            loss_fn = DiffusionLoss(model_cfg.prior_schedule.alphas_cumprod(), "sample")
    else:
        net = run.parallel(DecoderWithProjection(nets.text_proj, nets.decoder))
        loss_fn = HybridLoss(model_cfg.decoder_schedule.alphas_cumprod(), model_cfg.decoder_schedule.prediction_type)
    empty = clip.encode_text([""])

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x0, cond): the prior's normalised image embeddings (B, E) (the autoregressive prior's codes (B, K)) or
        the decoder's images (B, 3, S, S), with the network's keyword arguments; every dropout drawn from the
        step's generator."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)  # (B, 3, clip, clip) in [-1, 1]
        z = clip.encode_pixels(x)  # (B, E)
        b = x.shape[0]
        drop_text = torch.rand(b, generator=gen) < (cfg.text_dropout if prior_on else cfg.caption_dropout)
        text = clip.encode_text(captions)
        keep = ~drop_text
        cond = {"text_embeds": torch.where(keep[:, None], text.embeds, empty.embeds),
                "text_states": torch.where(keep[:, None, None], text.states, empty.states),
                "text_mask": torch.where(keep[:, None], text.mask, empty.mask)}
        if prior_on and ar:  # (codes (B, K), the dot token first: null where the caption is dropped)
            q = nets.prior.quantizer
            dots = torch.where(drop_text, nets.prior.cfg.null_dot, q.dot_tokens(cosine(z, text.embeds)))
            return q.encode(z), nets.prior.condition(dots, cond["text_embeds"], cond["text_states"],
                                                     cond["text_mask"])
        if prior_on:
            return nets.prior.normalize(z), cond
        small = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="area")  # (B, 3, S, S)
        drop_image = torch.rand(b, generator=gen) < cfg.image_dropout
        return small, {"image_embeds": z, "drop_image": drop_image, **cond}

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        x0, cond = batch
        if prior_on and ar:  # teacher forcing: logits row t predicts code t from the codes before it
            logits = net(x0[:, :-1], cond)  # (B, K, V)
            loss = F.cross_entropy(logits.flatten(0, 1), x0.flatten())
            return {"unclip/prior_loss": loss.item(), "unclip/grad_norm": s.update(loss, opt, params)}
        if prior_on:
            loss = loss_fn(net, x0, cond, s.generator)
            return {"unclip/prior_loss": loss.item(), "unclip/grad_norm": s.update(loss, opt, params)}
        simple, vlb = loss_fn.terms(net, x0, cond, s.generator)  # (B,), (B,)
        loss = loss_fn.combine(simple, vlb)
        return {"unclip/decoder_loss": loss.item(), "unclip/grad_norm": s.update(loss, opt, params),
                "unclip/simple": simple.mean().item(), "unclip/vlb_bpd": vlb.mean().item()}

    def export() -> None:
        save_unclip(ema.averaged, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) through the whole pipeline of the EMA nets."""
        pipe = pipeline_from_nets(ema.averaged, clip, "ema")
        images = pipe.generate(SAMPLE_PROMPTS, seed=0, steps=cfg.sample_steps).sample
        return Grid(images, list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in params)
    kind = f" ({'autoregressive' if ar else 'diffusion'})" if prior_on else ""
    about = f", unCLIP {cfg.train}{kind}: {n_params / 1e6:.2f}M trained parameters, shapes CLIP frozen"
    return Task(f"unclip-{cfg.train}", {"nets": nets, "ema": ema.averaged}, {"opt": opt}, prepare=prepare,
                step=step, ema=ema, grid=grid, export=export, about=about)


def train_unclip(cfg: UnCLIPTrainConfig, resume: bool = False, resume_lr: float | None = None,
                 clip: nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) an unCLIP prior or decoder training. Returns the exit code."""
    return fit(cfg, partial(build_unclip, clip=clip), resume=resume, resume_lr=resume_lr, given=given)
