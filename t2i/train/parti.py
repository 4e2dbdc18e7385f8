"""Train Parti or DALL-E mini (`t2i.systems.parti`) with the one training loop.

The step function for `t2i.train.fit`: images become (B, N) codes with the frozen VQ tokenizer,
captions are dropped to the empty one with probability `caption_dropout` (the unconditional model of
classifier-free guidance: Parti's CFG, DALL-E mini's super-conditioning), and the encoder-decoder
steps on the teacher-forced cross-entropy of every image token given [BOS], the tokens before it
and the caption (Parti sec. 2.2: a sequence-to-sequence model, text in, image tokens out). With
the word encoder ("words", DALL-E mini's) the caption's word ids go through the encoder inside the
step, so it learns with the decoder; with "minilm" (Parti's) the frozen states are computed while
the batch is prepared. The EMA weights, with the tokenizer, are exported as a self-describing
`model.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS
from t2i.systems.maskgit import load_text_encoder, text_conditioning
from t2i.systems.parti import PRESETS, PartiConfig, PartiPipeline, model_config, save_parti, start_tokens
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.ldm import SAMPLE_PROMPTS
from t2i.train.token_models import TokenTrainConfig, drop_captions, image_codes, token_setup


@dataclass
class PartiTrainConfig(TokenTrainConfig):
    """One Parti / DALL-E mini run (`TokenTrainConfig`'s settings and these)."""

    preset: str = "parti"  # t2i.systems.parti.PRESETS: "parti", "dalle-mini" or "parti-small"
    net_preset: str | None = None  # the decoder's shape; None: the preset's (`Preset.decoder`)
    text_encoder: str | None = None  # "words" or "minilm"; None: the preset's
    text_length: int = 20  # word encoder: [BOS] + the longest shapes caption (18 words) + 1


def resolve_model_config(cfg: PartiTrainConfig, vq_cfg: Any) -> PartiConfig:
    """The model config of a new run: the preset's branch member with the decoder shape of `net_preset`
    (unset: the preset's own)."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown Parti preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    shape = cfg.net_preset or PRESETS[cfg.preset].decoder
    if shape not in TOKEN_TRANSFORMER_PRESETS:
        raise ValueError(f"unknown token transformer preset {shape!r}; choose from {sorted(TOKEN_TRANSFORMER_PRESETS)}")
    return model_config(cfg.preset, TOKEN_TRANSFORMER_PRESETS[shape], vq_cfg, text_encoder=cfg.text_encoder,
                        text_length=cfg.text_length, attention=cfg.attention)


def parti_loss(net: torch.nn.Module, codes: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced cross-entropy, mean over the (B, N) codes: logits (B, N, V) of every image token
    from [BOS] and the tokens before it. cond: the decoder's keywords ("text" = [BOS], and "words"
    (B, L) for the word encoder or "context" / "context_mask" of frozen states)."""
    logits = net(codes[:, :-1], **cond)  # (B, N, V)
    return F.cross_entropy(logits.flatten(0, 1), codes.flatten())


def build_parti(cfg: PartiTrainConfig, run: Run, text_encoder: torch.nn.Module | None = None) -> Task:
    t = token_setup(cfg, run, lambda vq: resolve_model_config(cfg, vq.cfg), PartiConfig.from_dict)
    vq, model_cfg, net, ema = t.vq, t.model_cfg, t.net, t.ema
    words = model_cfg.text_encoder == "words"
    tokenize = model_cfg.tokenizer()
    minilm = None if words else text_encoder or load_text_encoder("minilm", model_cfg.text_length)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(codes (B, N), the decoder's cond of the captions with caption dropout drawn from `gen`)."""
        x, captions, _ = t.data.batch(position, cfg.batch_size, run.info)
        captions = drop_captions(captions, cfg.caption_dropout, gen)
        text = {"words": tokenize(captions)} if words else text_conditioning(minilm, captions)
        return image_codes(vq, x), {"text": start_tokens(len(captions)), **text}

    def step(batch: tuple[torch.Tensor, dict[str, torch.Tensor]], s: Step) -> dict[str, float]:
        loss = parti_loss(t.parallel, *batch)
        gnorm = s.update(loss, t.opt, net.parameters(), "Parti loss")
        return {"parti/loss": loss.item(), "parti/grad_norm": gnorm}

    def export() -> None:
        save_parti(ema.averaged, vq, model_cfg, Path(cfg.out) / "model.safetensors")

    @torch.no_grad()
    def grid() -> Grid:
        """SAMPLE_PROMPTS (seed 0 each) from the EMA network with the model's default settings."""
        pipe = PartiPipeline(ema.averaged, vq, model_cfg, name="ema", minilm=minilm)
        return Grid(pipe.decode_pixels(pipe.generate(list(SAMPLE_PROMPTS), seed=0).sample), list(SAMPLE_PROMPTS))

    n_params = sum(p.numel() for p in net.parameters())
    enc = model_cfg.encoder
    reads = f"a {enc.layers}-layer word encoder" if enc is not None else "frozen MiniLM states"
    about = (f", {model_cfg.preset} encoder-decoder {n_params / 1e6:.2f}M parameters: {reads}, a "
             f"{model_cfg.net.layers}-layer causal decoder over {model_cfg.net.num_tokens} image tokens "
             f"(tokenizer {cfg.vqvae})")
    return Task("parti", {"net": net, "ema": ema.averaged}, {"opt": t.opt}, prepare=prepare, step=step, ema=ema,
                grid=grid, export=export, about=about)


def train_parti(cfg: PartiTrainConfig, resume: bool = False, resume_lr: float | None = None,
                text_encoder: torch.nn.Module | None = None, given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a Parti / DALL-E mini training. Returns the exit code.

    text_encoder: for "minilm" models, an object with .encode(list[str]) -> TextEncoding (default MiniLM)."""
    return fit(cfg, partial(build_parti, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)
