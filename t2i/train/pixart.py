"""Train a PixArt-alpha network on the shapes world with the one training loop (`t2i train pixart`).

DiT's step function (`t2i.train.dit.build_latent_transformer`) with PixArt's conditioning: the network
(adaLN-single, cross-attention to the projected text) reads the frozen MiniLM token states of each scene's
caption with their padding mask (no T5 weights exist here, and MiniLM is what every shapes model reads),
10% of captions replaced by the empty caption for classifier-free guidance. Latents of the built-in model's
autoencoder. The EMA model is exported as a self-describing `model.safetensors` that the PixArt family
(`t2i.systems.pixart`) loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from t2i.autoencoders.kl import AutoencoderKL
from t2i.nets.dit import DiT
from t2i.systems.dit import LatentTransformerConfig
from t2i.systems.pixart import PixArtPipeline, load_minilm
from t2i.train.data import open_data
from t2i.train.dit import LatentTrainConfig, build_latent_transformer, load_autoencoder, model_config
from t2i.train.fit import Run, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS


@dataclass
class PixArtTrainConfig(LatentTrainConfig):
    preset: str = "pixart_shapes_s"
    text_length: int = 32  # MiniLM tokens per caption (shapes captions are ~10)


def build_pixart(cfg: PixArtTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    vae = load_autoencoder(cfg.vae_from)
    text = text_encoder or load_minilm(cfg.text_length)
    if cfg.model is None:
        model = model_config(cfg, vae, text_encoder="minilm", text_length=cfg.text_length)
        if not model.net.caption_dim:
            raise ValueError(f"--preset {cfg.preset} does not cross-attend to text: use a PixArt preset")
        model.net.caption_dim = text.context_dim  # the preset's width is its own encoder's
        cfg.model = model.to_dict()
    model_cfg = LatentTransformerConfig.from_dict(cfg.model)
    vae.cfg.scaling_factor = model_cfg.vae.scaling_factor
    if model_cfg.net.caption_dim != text.context_dim:
        raise ValueError(f"the network reads {model_cfg.net.caption_dim}-wide text states, the text encoder "
                         f"gives {text.context_dim}")
    data = open_data("shapes", None, cfg.image_size, cfg.seed, run.log.text, cfg.background_p)

    def batches(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images and context (B, T, 384) + mask (B, T) of the captions, one batched MiniLM call."""
        x, captions, _ = data.batch(position, cfg.batch_size, run.info)
        drop = torch.rand(len(captions), generator=gen) < cfg.condition_dropout
        enc = text.encode(["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)])
        return x, {"context": enc.context.float(), "mask": enc.mask.bool()}

    def pipeline(net: DiT, vae: AutoencoderKL, c: LatentTransformerConfig) -> PixArtPipeline:
        return PixArtPipeline(net, vae, text, c.schedule, name="ema", defaults=c.defaults())

    return build_latent_transformer(cfg, run, "pixart", vae, model_cfg, batches, pipeline, SAMPLE_PROMPTS)


def train_pixart(cfg: PixArtTrainConfig, resume: bool = False, resume_lr: float | None = None,
                 text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a PixArt training. Returns the exit code.

    text_encoder: an object with .encode(list[str]) -> TextEncoding and context_dim; default MiniLM."""
    return fit(cfg, partial(build_pixart, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr,
               given=given)
