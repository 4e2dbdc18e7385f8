"""Train an image tokenizer with the one training loop: `t2i train vqvae --kind KIND`.

Kinds (`t2i.autoencoders.tokenizers.KINDS`):
- vqvae (van den Oord et al. 2017): MSE reconstruction + the commitment loss (eq. 3; the codebook
  term is replaced by the quantizer's EMA update, which runs inside the forward pass).
- vqgan (Esser et al. 2021): the same network on the VQGAN objective (`t2i.autoencoders.vqgan`):
  L1 + perceptual (the frozen shapes CLIP tower) + commitment + adaptively weighted patch-GAN, the
  discriminator stepped on the hinge loss once it has started. Adam betas (0.5, 0.9), as taming.
- vit-vqgan (Yu et al. 2022): ViT encoder/decoder, factorized l2-normalised codes, the VQGAN objective.
- dvae (Ramesh et al. 2021): MSE + beta(step) * KL to the uniform prior, Gumbel-softmax at tau(step)
  (`t2i.autoencoders.dvae`: tau 1 -> 1/16 and beta 0 -> kl_weight on cosine schedules).
- vqvae2 (Razavi et al. 2019): two EMA codebooks, MSE + both commitment terms.
Every kind logs codebook usage (`vq/perplexity` of the batch's codes, `vq/dead_codes`). The grids
show a fixed batch (originals on top, the code round trip below); each checkpoint also exports
the tokenizer file (`vqvae.safetensors`, `vqgan.safetensors`, ...), which the token models read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.autoencoders.dvae import gumbel_temperature, kl_weight
from t2i.autoencoders.tokenizers import KINDS, kind_of, round_trip, save_tokenizer, tokenizer_config_from_dict
from t2i.autoencoders.vit_vqgan import ViTVQGANConfig
from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.autoencoders.vqgan import VQGANLoss, VQGANLossConfig
from t2i.checkpoints.io import save_module
from t2i.checkpoints.limits import load_checked_file
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.fit import Grid, Run, Step, Task, fit


@dataclass
class VQTrainConfig(LoopConfig):
    """One tokenizer run. `out` holds checkpoints/, samples/, tb/, log.txt and the tokenizer file.
    `vq` is the network config of `kind` (a VQAutoencoderConfig for vqvae and vqgan)."""

    kind: str = "vqvae"  # vqvae | vqgan | vit-vqgan | dvae | vqvae2
    vq: Any = field(default_factory=lambda: dataclasses.replace(VQ_CONFIGS["f4"]))
    gan: VQGANLossConfig = field(default_factory=VQGANLossConfig)  # vqgan and vit-vqgan
    tau_start: float = 1.0  # dvae: Gumbel-softmax temperature at step 0 ...
    tau_end: float = 1.0 / 16  # ... annealed to this ...
    tau_steps: int = 2000  # ... over these steps (cosine)
    kl_weight: float = 0.01  # dvae: weight of the KL to the uniform prior (per position, vs per-pixel MSE) ...
    kl_steps: int = 500  # ... reached over these steps from 0 (cosine)
    data: str = "shapes"  # shapes | folder | jsonl
    data_path: str | None = None
    image_size: int = 64
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's 0.25)
    steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-4  # Adam, as in the paper
    grad_clip: float = 10.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQTrainConfig:
        """As LoopConfig's, with `vq` rebuilt as its kind's config (runs saved before kinds: a VQ-VAE's)."""
        d = dict(d)
        vq = d.pop("vq", None)
        cfg = super().from_dict(d)
        if vq is not None:
            cfg.vq = tokenizer_config_from_dict(vq)
        return cfg


def tokenizer_preset(kind: str, preset: str | None) -> Any:
    """The network config of `kind` for a named preset (None: f4)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {', '.join(KINDS)}")
    presets = KINDS[kind].presets
    if (preset or "f4") not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose from {sorted(presets)}")
    return dataclasses.replace(presets[preset or "f4"])


def check_network_options(vq: Any, given: dict[str, str]) -> None:
    """Refuse an option (config path "vq.FIELD" -> flag) whose field this kind's network config lacks
    (e.g. --codebook-decay for the dVAE), rather than set an attribute nothing reads."""
    fields = {f.name for f in dataclasses.fields(vq)}
    for path, flag in given.items():
        if path.startswith("vq.") and path[3:] not in fields:
            raise ValueError(f"{flag} does not apply to a {kind_of(vq)} tokenizer")


def export_name(kind: str) -> str:
    """The tokenizer file a run of `kind` exports: vqvae.safetensors, vit_vqgan.safetensors, ..."""
    return f"{kind.replace('-', '_')}.safetensors"


def save_vqvae(model: VQAutoencoder, path: str | Path) -> None:
    """The tokenizer's weights and codebook (with its EMA statistics) and its config in the metadata."""
    save_module(model, path, "vq_autoencoder")


def load_vqvae(path: str | Path) -> VQAutoencoder:
    """A VQ-VAE (or VQGAN) tokenizer written by `save_vqvae`, checked before allocating, frozen.
    Any kind: `t2i.autoencoders.tokenizers.load_tokenizer`."""
    return load_checked_file(path, "vq_autoencoder", "a VQ autoencoder file", VQAutoencoderConfig, VQAutoencoder)


def codebook_logs(q: Any) -> dict[str, float]:
    """The quantizer's scalars: its loss term, perplexity and dead codes (and each kind's extras)."""
    logs = {"vq/commitment": q.commitment.item(), "vq/perplexity": q.perplexity.item(),
            "vq/dead_codes": float(q.dead_codes)}
    if hasattr(q, "kl"):  # dVAE
        logs.update({"vq/kl": q.kl.item(), "vq/tau": q.tau})
    if hasattr(q, "top"):  # VQ-VAE-2: the bottom's perplexity above, the top's here
        logs["vq/perplexity_top"] = q.top.perplexity.item()
    return logs


def vq_loss(model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator | None = None,
            **forward_kw: float) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE reconstruction + the quantizer's term (VQ-VAE eq. 3 without the codebook term; the dVAE's
    weighted KL) of x (B, 3, H, W), and the scalars to log. In training mode the quantizer's codebook
    takes its step. forward_kw: the dVAE's tau and kl_weight."""
    recon, q = model(x, generator, **forward_kw)  # (B, 3, H, W)
    rec = F.mse_loss(recon, x)
    return rec + q.commitment, {"vq/rec_mse": rec.item(), **codebook_logs(q)}


def dvae_schedule(cfg: VQTrainConfig, step: int) -> dict[str, float]:
    """The dVAE's forward arguments at a step: temperature and KL weight."""
    return {"tau": gumbel_temperature(step, cfg.tau_start, cfg.tau_end, cfg.tau_steps),
            "kl_weight": kl_weight(step, cfg.kl_weight, cfg.kl_steps)}


def _last_layer(model: torch.nn.Module) -> torch.Tensor:
    return model.last_layer() if hasattr(model, "last_layer") else model.decoder.conv_out.weight


def build_vqvae(cfg: VQTrainConfig, run: Run) -> Task:
    kind = KINDS.get(cfg.kind)
    if kind is None or not isinstance(cfg.vq, kind.config):
        raise ValueError(f"--kind {cfg.kind}: the network config is a {kind_of(cfg.vq)} one")
    if isinstance(cfg.vq, ViTVQGANConfig) and cfg.vq.sample_size != cfg.image_size:
        raise ValueError(f"ViT-VQGAN {cfg.vq.sample_size}px preset, --image-size {cfg.image_size}: they must match")
    model = kind.network(cfg.vq)
    betas = (0.5, 0.9) if kind.gan else (0.9, 0.999)  # the GAN setting of taming's first stage
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas)
    modules, optimizers = {"vq": model}, {"opt": opt}
    data = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed, run.log.text, cfg.background_p,
                     workers=cfg.data_workers)
    fixed = open_data(cfg.data, cfg.data_path, cfg.image_size, cfg.seed + 1, run.log.text)
    fixed_x, fixed_captions, _ = fixed.batch(0, 8, DistInfo())  # the same 8 images in every grid
    model_ddp = run.parallel(model)
    gan = None
    if kind.gan:
        from t2i.autoencoders.perceptual import CLIPPerceptual

        gan = VQGANLoss(cfg.gan, CLIPPerceptual.load() if cfg.gan.perceptual_weight > 0 else None)
        opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=cfg.lr, betas=betas)
        modules["loss"], optimizers["opt_d"] = gan, opt_d
        disc_ddp = run.parallel(gan.discriminator)

    def step(x: torch.Tensor, s: Step) -> dict[str, float]:
        kw = dvae_schedule(cfg, s.index) if cfg.kind == "dvae" else {}
        if gan is None:
            loss, logs = vq_loss(model_ddp, x, s.generator, **kw)
        else:
            recon, q = model_ddp(x, s.generator)
            loss, logs = gan.generator_loss(x, recon, q.commitment, s.index, _last_layer(model))
            logs.update(codebook_logs(q))
        gnorm = s.update(loss, opt, model.parameters(), "tokenizer loss")
        if gan is not None and s.index >= cfg.gan.disc_start and cfg.gan.disc_weight > 0:
            d_loss, d_logs = gan.discriminator_loss(x, recon, s.index, disc_ddp)
            s.update(d_loss, opt_d, None, "discriminator loss")
            logs.update(d_logs)
        return {"vq/loss": loss.item(), **logs, **({"vq/kl_weight": kw["kl_weight"]} if kw else {}),
                "vq/grad_norm": gnorm}

    @torch.no_grad()
    def grid() -> Grid:
        rec = round_trip(model, fixed_x)
        return Grid(torch.cat([fixed_x, rec]), [*fixed_captions, *["reconstruction"] * len(rec)])

    k, f = cfg.vq.num_codes, cfg.vq.downsample_factor
    return Task("vqvae", modules, optimizers, prepare=lambda position, gen: data.batch(
                    position, cfg.batch_size, run.info)[0], step=step, grid=grid, grid_name="recon",
                export=lambda: save_tokenizer(model, Path(cfg.out) / export_name(cfg.kind)),
                about=f", {cfg.kind}, {k} codes, f={f}")


def train_vqvae(cfg: VQTrainConfig, resume: bool = False, resume_lr: float | None = None,
                given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a tokenizer training. Returns the process exit code."""
    return fit(cfg, build_vqvae, resume=resume, resume_lr=resume_lr, given=given)
