"""Muse (Chang et al. 2023): a text-conditional masked token transformer at a low token resolution (the
base), then a token super-resolution transformer (sec. 2.4) that writes the high-resolution image's
tokens conditioned on the base's tokens and on the text; both decoded by MaskGIT's parallel decoding
with classifier-free guidance on the logits.

Here both stages read the same VQ tokenizer (on the shapes world the f8 one: the base's 8x8 tokens are
a 64x64 image, the super-resolution's 16x16 tokens a 128x128 one; a convolutional tokenizer encodes any
size) and the same frozen MiniLM token states:

- the base is a MaskGIT network (`t2i.systems.maskgit`, trained by `t2i train maskgit`), unchanged;
- the super-resolution network (`MuseTransformer`) is MaskGIT's `TokenTransformer` over the high-res map
  whose cross-attention context is, as in Muse, the text states followed by the low-res tokens passed
  through a few self-attention layers (`LowResEncoder`, projected to the text width): "the resulting
  output embeddings are concatenated with text embeddings ... and used as conditioning for the high-res
  transformer via cross-attention". It is trained with MaskGIT's loss on the high-res tokens, the
  low-res tokens those of the same image downsampled (`t2i train muse-sr`).

A Muse file is a token family's file (`t2i.systems.token_models`: `transformer.*`, `vq.*`, the config
in the metadata) whose transformer also holds the base (`transformer.base.*`), so that one file, one
precision cast and one int8 quantization cover both; `bundle_muse` writes it from a MaskGIT file and
a trained super-resolution network. Generation: base tokens (B, n) -> super-resolution tokens (B, N)
-> the tokenizer's decoder. A request's steps, guidance, negative prompt and token draws apply to
both stages (2 x steps model calls); image i of seed s uses one generator, the base's draws first.

Inpainting and outpainting are Muse's zero-shot editing (the tokens of the region to redraw
masked, the rest kept, and the usual decoding fills them in; `init_image` + `mask`, white = repaint,
`strength` as aMUSEd's: the last int(steps x strength) steps of each stage, on the model's own schedule).
It runs in both stages: the base redraws the masked part of the image's low-res tokens (the image
area-averaged to the base's size, as the super-resolution's training makes them), then the
super-resolution redraws the masked part of the image's high-res tokens reading the edited low-res map.
Editing the base alone would not keep the image at full resolution (the super-resolution redraws every
token), and the super-resolution alone would read low-res tokens that still show the old region (or a
fresh base image that does not match the kept part); both together keep every unmasked high-res token
exactly and condition the redrawn ones on a low-res map that agrees with the prompt and the kept region.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.vq import VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.io import CheckpointError
from t2i.checkpoints.limits import check_config
from t2i.nets.muse_transformer import MuseTransformer, low_res_config
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformer, TokenTransformerConfig
from t2i.nets.word_encoder import WordEncoderConfig
from t2i.systems.base import GenerationDefaults, GenerationRequest, StepReport
from t2i.systems.maskgit import OPTIONS, MaskGITConfig, MaskGITPipeline, load_text_encoder
from t2i.systems.token_models import (
    EDIT_OPTIONS,
    check_edit_request,
    edit_steps,
    load_pipeline,
    load_token_model,
    network_configs,
    save_token_model,
    token_system,
)
from t2i.tokens import GuidedCond

SYSTEM_NAME = "muse"
SAMPLERS = ("maskgit",)  # parallel decoding; MaskGIT's raster order would take n + N calls


# ---------------------------------------------------------------------------------------
# The model config
# ---------------------------------------------------------------------------------------


@dataclass
class MuseConfig(MaskGITConfig):
    """MaskGIT's config of the super-resolution network (`net`, its sampling settings, which both stages
    use) and the two parts Muse adds: the low-res encoder and the base network (None until bundled)."""

    net: TokenTransformerConfig = field(default_factory=lambda: replace(TOKEN_TRANSFORMER_PRESETS["shapes"], grid=16))
    low_res: WordEncoderConfig = field(default_factory=lambda: low_res_config(
        replace(TOKEN_TRANSFORMER_PRESETS["shapes"]), 8, 2))
    base: TokenTransformerConfig | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MuseConfig:
        d = network_configs(d)
        d["low_res"] = WordEncoderConfig(**d["low_res"])
        check_config(d["low_res"], "Muse's low-res encoder")  # bounds before the meta build
        if d.get("base") is not None:
            d["base"] = TokenTransformerConfig(**d["base"])
            check_config(d["base"], "Muse's base network")
        return cls(**d)

    def network(self) -> MuseTransformer:
        """The network this config describes (`t2i.systems.token_models.build_network`)."""
        return MuseTransformer(self.net, self.low_res, self.base)


def sr_config(base: MaskGITConfig, net: TokenTransformerConfig, factor: int = 2, low_res_layers: int = 2,
              steps: int | None = None) -> MuseConfig:
    """A new super-resolution network's config over a MaskGIT base: `net`'s shape on the base's codebook
    and text states at `factor` times its token grid; the base's sampling settings (its `steps` unless
    given). The base network itself is added by `bundle_muse`."""
    hr = replace(net, num_codes=base.net.num_codes, grid=base.net.grid * factor, causal=False,
                 context_dim=base.net.context_dim)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(MaskGITConfig)}
    return MuseConfig(**{**fields, "net": hr, "steps": steps or base.steps},
                      low_res=low_res_config(hr, base.net.grid, low_res_layers))


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


class MusePipeline(MaskGITPipeline):
    """A bundled Muse model: the base and super-resolution networks, their tokenizer and MiniLM.

    MaskGIT's pipeline over the super-resolution network (its conditioning, CFG and parallel decoding),
    which first draws the base's tokens with the same decoding and hands them over as `low_res`.
    """

    family = SYSTEM_NAME
    options, samplers = OPTIONS | EDIT_OPTIONS, SAMPLERS

    def __init__(self, net: MuseTransformer, vq: VQAutoencoder, text_encoder: nn.Module, cfg: MuseConfig,
                 name: str = "muse", defaults: GenerationDefaults | None = None) -> None:
        if net.base is None:
            raise ValueError("this Muse network has no base: bundle it with one (t2i.systems.muse.bundle_muse)")
        super().__init__(net, vq, text_encoder, cfg, name, defaults)

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        return check_edit_request(super()._resolve(request))

    def _check(self, r: GenerationRequest) -> None:
        n = self.unet.base.cfg.num_tokens
        if not 1 <= r.steps <= n:
            raise ValueError(f"steps must be between 1 and the base's {n} tokens, got {r.steps}")

    def total_steps(self, r: GenerationRequest) -> int:
        return 2 * edit_steps(r)  # the base's decoding steps, then the super-resolution's

    def _sample(self, r: GenerationRequest, prompts: list[str], negatives: list[str],
                generators: list[torch.Generator], report: StepReport) -> torch.Tensor:
        """Both stages; an edit (init_image + mask) runs in both: the base redraws the masked part of the
        image's low-res tokens, then the super-resolution redraws the masked part of its high-res tokens
        reading the edited low-res ones (module docstring)."""
        cond = self.conditioning(r, prompts, negatives)  # the text, encoded once for both stages
        base, n, factor = self.unet.base.cfg.grid, len(prompts), self.unet.cfg.grid // self.unet.base.cfg.grid
        edit = self.edit_settings(r, (base, base), n, self.cfg.schedule, downscale=factor)
        low = self.sample_tokens(self.unet.base, cond, r, generators, report, edit=edit)  # (B, n)
        # the unconditional branch keeps the low-res tokens: guidance is on the text (Muse's CFG)
        sr = GuidedCond({**cond.cond, "low_res": low}, None if cond.uncond is None else {**cond.uncond, "low_res": low})
        edit = self.edit_settings(r, (self.unet.cfg.grid,) * 2, n, self.cfg.schedule)
        return self.sample_tokens(self.unet, sr, r, generators,
                                  lambda info: report({**info, "i": info["i"] + edit_steps(r)}), edit=edit)

    @torch.no_grad()
    def decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) high-res codes -> (B, 3, H, W) in [-1, 1]; (B, n) base codes (a live preview, or a run
        stopped in the base stage) -> the base image upsampled bilinearly to H x W."""
        if codes.shape[1] == self.unet.cfg.num_tokens:
            return super().decode_pixels(codes)
        g = self.unet.base.cfg.grid
        low = self.vq.decode_codes(codes.view(-1, g, g)).float()
        return F.interpolate(low, size=(self.image_size,) * 2, mode="bilinear", align_corners=False).clamp(-1, 1)


# ---------------------------------------------------------------------------------------
# The t2i file: bundle, save, load, a tiny one
# ---------------------------------------------------------------------------------------


def bundle(sr: MuseTransformer, cfg: MuseConfig, base: TokenTransformer) -> tuple[MuseTransformer, MuseConfig]:
    """The super-resolution network with `base` inside (copies of both weights) and its config."""
    if sr.cfg != cfg.net or base.cfg.num_codes != cfg.net.num_codes or base.cfg.num_tokens != cfg.low_res.length:
        raise ValueError(f"the base writes a {base.cfg.grid}x{base.cfg.grid} map of {base.cfg.num_codes} codes; this "
                         f"super-resolution network reads {cfg.low_res.length} tokens of {cfg.net.num_codes}")
    full = replace(cfg, base=base.cfg)
    net = full.network()
    state = {k: v for k, v in sr.state_dict().items() if not k.startswith("base.")}
    net.load_state_dict({**state, **{f"base.{k}": v for k, v in base.state_dict().items()}})
    return net.eval().requires_grad_(False), full


def save_muse(net: MuseTransformer, vq: VQAutoencoder, cfg: MuseConfig, path: str | Path) -> None:
    """The networks (with the base, when bundled), the tokenizer and the resolved config in one file."""
    save_token_model(net, vq, dataclasses.asdict(cfg), path, SYSTEM_NAME)


def bundle_muse(base: str | Path, sr: str | Path, out: str | Path) -> Path:
    """A Muse file at `out` from a MaskGIT file `base` and a super-resolution file `sr` (a Muse file,
    bundled or not, e.g. a `t2i train muse-sr` run's sr.safetensors): the same tokenizer required."""
    from t2i.systems.maskgit import SYSTEM_NAME as MASKGIT
    from t2i.train.token_models import weights_digest

    base_net, base_vq, base_cfg = load_token_model(Path(base), MASKGIT, "a t2i MaskGIT file", MaskGITConfig.from_dict)
    sr_net, vq, cfg = load_token_model(Path(sr), SYSTEM_NAME, "a t2i Muse file", MuseConfig.from_dict)
    if base_cfg.vq != vq.cfg or weights_digest(base_vq) != weights_digest(vq):
        raise CheckpointError(f"{base} and {sr} were trained on different tokenizers")
    if (base_cfg.text_encoder, base_cfg.text_length) != (cfg.text_encoder, cfg.text_length):
        raise CheckpointError(f"{base} and {sr} read different text encoders")
    net, full = bundle(sr_net, cfg, base_net)
    save_muse(net, vq, full, out)
    return Path(out)


def load(path: Path, dtype: torch.dtype = torch.float32) -> MusePipeline:
    """A bundled Muse file (or a folder holding it as model.safetensors) -> MusePipeline."""
    return load_pipeline(path, dtype, SYSTEM_NAME, "a t2i Muse file", MuseConfig.from_dict,
                         lambda net, vq, cfg, name: MusePipeline(
                             net, vq, load_text_encoder(cfg.text_encoder, cfg.text_length), cfg, name=name))


def tiny_config(vq: VQAutoencoderConfig) -> MuseConfig:
    """The tiny preset as base (the tokenizer's map) and super-resolution (twice its grid), bundled."""
    base = MaskGITConfig(net=replace(TOKEN_TRANSFORMER_PRESETS["tiny"], num_codes=vq.num_codes), vq=vq, steps=4)
    return replace(sr_config(base, TOKEN_TRANSFORMER_PRESETS["tiny"], low_res_layers=1), base=base.net)


SYSTEM = token_system(SYSTEM_NAME, "Muse: a MaskGIT base and a token super-resolution transformer reading its "
                      "tokens and MiniLM text states", load, tiny_config)
