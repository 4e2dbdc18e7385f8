"""Train a DALL-E-style autoregressive transformer (Ramesh et al. 2021, sec. 2.2) with the one loop.

The step function for `t2i.train.fit`: images become (B, N) codes with the frozen VQ tokenizer,
captions (B, text_length) word ids (`t2i.systems.dalle.WordTokenizer`; 10% replaced by the empty
caption, so that the model also learns the unconditional stream for guidance), and the causal
transformer over [text; image] steps on teacher-forced cross-entropy: every text token after
[BOS] and every image token predicted from all before it, weighted text : image = 1/8 : 7/8 as
DALL-E ("We normalize the cross-entropy losses for the text and image tokens by the total number
of each kind in a batch of data ... we multiply the cross-entropy loss for the text by 1/8 and the
cross-entropy loss for the image by 7/8"). The
self-attention masks (full causal, DALL-E's sparse row / column / convolutional schedule, or a
sliding window) are the network config's. The EMA weights, with the tokenizer and the word
vocabulary, are exported as a self-describing `model.safetensors` (`t2i.systems.dalle`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.data.shapes_vocab import vocabulary
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS
from t2i.systems.dalle import DalleConfig, DallePipeline, dalle_net_config, save_dalle
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS
from t2i.train.token_models import TokenTrainConfig, drop_captions, image_codes, token_setup


@dataclass
class DalleTrainConfig(TokenTrainConfig):
    """One DALL-E run (`TokenTrainConfig`'s settings and these; attention "dalle" is DALL-E's sparse
    masks by layer)."""

    text_length: int = 20  # [BOS] + the longest shapes caption (18 words) + 1
    text_loss_weight: float = 0.125  # DALL-E's 1/8; the image loss takes 1 - this


def resolve_model_config(cfg: DalleTrainConfig, vq_cfg: Any) -> DalleConfig:
    """The model config of a new run: the preset's shape as a causal [text; image] stream over the
    tokenizer's codebook and token map, the shapes vocabulary as its words."""
    if cfg.net_preset not in TOKEN_TRANSFORMER_PRESETS:
        raise ValueError(f"unknown token transformer preset {cfg.net_preset!r}; "
                         f"choose from {sorted(TOKEN_TRANSFORMER_PRESETS)}")
    words = sorted(vocabulary())
    preset = dataclasses.replace(TOKEN_TRANSFORMER_PRESETS[cfg.net_preset], num_codes=vq_cfg.num_codes,
                                 grid=vq_cfg.sample_size // vq_cfg.downsample_factor)
    return DalleConfig(net=dalle_net_config(preset, words, cfg.text_length, cfg.attention), vq=vq_cfg, words=words)


def dalle_loss(net: torch.nn.Module, text: torch.Tensor, codes: torch.Tensor,
               text_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher-forced cross-entropy of the [text; image] stream: text ids (B, Lt) from the second on,
    codes (B, N) all; ``text_weight * text + (1 - text_weight) * image``, each a mean over its tokens."""
    image_logits, text_logits = net(codes[:, :-1], text=text, with_text_logits=True)  # (B, N, V), (B, Lt - 1, Vt)
    image = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
    text_loss = F.cross_entropy(text_logits.flatten(0, 1), text[:, 1:].flatten())
    loss = text_weight * text_loss + (1 - text_weight) * image
    return loss, {"dalle/image_loss": image.item(), "dalle/text_loss": text_loss.item()}


def build_dalle(cfg: DalleTrainConfig, run: Run) -> Task:
    t = token_setup(cfg, run, lambda vq: resolve_model_config(cfg, vq.cfg), DalleConfig.from_dict)
    vq, model_cfg, net, ema = t.vq, t.model_cfg, t.net, t.ema
    tokenize = model_cfg.tokenizer()

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(text ids (B, Lt) with caption dropout drawn from `gen`, codes (B, N))."""
        x, captions, _ = t.data.batch(position, cfg.batch_size, run.info)
        return tokenize(drop_captions(captions, cfg.caption_dropout, gen)), image_codes(vq, x)

    def step(batch: tuple[torch.Tensor, torch.Tensor], s: Step) -> dict[str, float]:
        loss, logs = dalle_loss(t.parallel, *batch, cfg.text_loss_weight)
        gnorm = s.update(loss, t.opt, net.parameters(), "DALL-E loss")
        return {"dalle/loss": loss.item(), **logs, "dalle/grad_norm": gnorm}

    def export() -> None:
        save_dalle(ema.averaged, vq, model_cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) from the EMA network with the model's default settings."""
        pipe = DallePipeline(ema.averaged, vq, model_cfg, name="ema")
        return Grid(pipe.decode_pixels(pipe.generate(list(SAMPLE_PROMPTS), seed=0).sample), list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in net.parameters())
    about = (f", causal token transformer {n_params / 1e6:.2f}M parameters over {model_cfg.net.text_length} text + "
             f"{model_cfg.net.num_tokens} image tokens ({model_cfg.net.attention} attention, tokenizer {cfg.vqvae})")
    return Task("dalle", {"net": net, "ema": ema.averaged}, {"opt": t.opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def train_dalle(cfg: DalleTrainConfig, resume: bool = False, resume_lr: float | None = None,
                given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a DALL-E training. Returns the exit code."""
    return fit(cfg, build_dalle, resume=resume, resume_lr=resume_lr, given=given)
