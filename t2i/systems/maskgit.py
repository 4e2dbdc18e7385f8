"""MaskGIT (Chang et al. 2022): a bidirectional transformer writes a VQ token map in a few parallel
steps, text-conditional by cross-attention to the frozen MiniLM token states (as Muse conditions
on a frozen text encoder), with classifier-free guidance on the logits (Muse, "Classifier Free
Guidance": ``l_u + s (l_c - l_u)``).

Decoding is `t2i.tokens.sample_masked` (sec. 3.2: all tokens unknown at first; each step samples
every unknown one, keeps the most confident and re-masks the rest by the cosine schedule; the
confidence is the sampled token's log probability plus Gumbel noise annealed to 0). `steps` is the
number of decoding steps (model calls), `guidance` the CFG scale (1: conditional only), and the
negative prompt, when given, is the unconditional branch. The tokens are decoded by the VQ
tokenizer stored in the same file (`t2i.systems.token_models`), so a model file needs no other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.io import is_system_file, system_file
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformer, TokenTransformerConfig
from t2i.systems.base import Capabilities, GenerationDefaults, GenerationRequest, StepReport, System
from t2i.systems.token_models import TokenPipeline, load_token_model, network_configs, save_token_model
from t2i.tokens import CFGTokenModel, GuidedCond, sample_masked

SYSTEM_NAME = "maskgit"
OPTIONS = frozenset({"steps", "sampler", "guidance", "negative_prompt", "width", "height"})  # what run() honours
SAMPLERS = ("maskgit",)  # parallel decoding (the only one: named so the PNG parameters say how it was drawn)


@dataclass
class MaskGITConfig:
    """Everything needed to rebuild a MaskGIT model from its file (and its generation defaults).

    choice_temperature: the Gumbel noise scale of the confidences at the first step, annealed to 0
    (MaskGIT's official default 4.5); temperature: of the token draws; schedule: the mask schedule
    ("cosine", MaskGIT sec. 3.3, or "linear")."""

    net: TokenTransformerConfig = field(default_factory=lambda: replace(TOKEN_TRANSFORMER_PRESETS["shapes"]))
    vq: VQAutoencoderConfig = field(default_factory=lambda: replace(VQ_CONFIGS["f8"]))
    text_encoder: str = "minilm"
    text_length: int = 32
    steps: int = 8
    guidance: float = 3.0
    choice_temperature: float = 4.5
    temperature: float = 1.0
    schedule: str = "cosine"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskGITConfig:
        return cls(**network_configs(d))


def text_conditioning(text_encoder: nn.Module, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The network's cross-attention inputs for prompts: context (B, T, 384) float32 and
    context_mask (B, T) bool, True on real tokens (left out for an encoder without a mask)."""
    enc = text_encoder.encode(prompts)
    cond = {"context": enc.context.float()}
    return cond if enc.mask is None else {**cond, "context_mask": enc.mask}  # None: every position is real


def load_text_encoder(name: str, length: int) -> nn.Module:
    """The frozen text encoder a token model's config names (MiniLM is the only one yet)."""
    if name != "minilm":
        raise ValueError(f"unknown text encoder {name!r} (expected 'minilm')")
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=length)


class MaskGITPipeline(TokenPipeline):
    """A bidirectional token transformer, its tokenizer and the frozen text encoder.

    Args:
        net: the transformer (MaskGIT's reading: [MASK] = num_codes).
        vq: the frozen tokenizer.
        text_encoder: prompts -> TextEncoding (context, mask).
        cfg: the model config (its sampling settings are used: choice temperature, schedule).
    """

    family = SYSTEM_NAME

    def __init__(self, net: TokenTransformer, vq: VQAutoencoder, text_encoder: nn.Module, cfg: MaskGITConfig,
                 name: str = "maskgit", defaults: GenerationDefaults | None = None) -> None:
        if net.cfg.causal or net.cfg.context_dim is None:
            raise ValueError("MaskGIT needs a bidirectional transformer that cross-attends to text states")
        size = net.cfg.grid * vq.cfg.downsample_factor
        super().__init__(net, vq, name, defaults or GenerationDefaults(
            sampler="maskgit", steps=cfg.steps, guidance=cfg.guidance, width=size, height=size))
        self.text_encoder, self.cfg = text_encoder, cfg

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(options=OPTIONS, samplers=SAMPLERS, size_multiple=self.image_size,
                            native_size=(self.image_size,) * 2)

    def _check(self, r: GenerationRequest) -> None:
        if r.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= r.steps <= self.unet.cfg.num_tokens:
            raise ValueError(f"steps must be between 1 and the {self.unet.cfg.num_tokens} tokens, got {r.steps}")

    def prompt_warning(self, prompt: str) -> str | None:
        return out_of_world_warning(prompt)

    def _sample(self, r: GenerationRequest, prompts: list[str], negatives: list[str],
                generators: list[torch.Generator], report: StepReport) -> torch.Tensor:
        guided = r.guidance != 1.0
        texts = list(dict.fromkeys(prompts + (negatives if guided else [])))
        every = text_conditioning(self.text_encoder, texts)  # each text encoded once

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            rows = torch.tensor([texts.index(t) for t in batch])
            return {k: v[rows] for k, v in every.items()}

        cond = GuidedCond(pick(prompts), pick(negatives) if guided else None)
        model = CFGTokenModel(lambda tokens, c: self.unet(tokens, **c), r.guidance)
        c = self.cfg
        return sample_masked(model, cond, self.unet.cfg.num_tokens, steps=r.steps, mask_id=self.unet.cfg.mask_id,
                             generators=generators, schedule=c.schedule, temperature=c.temperature,
                             choice_temperature=c.choice_temperature,
                             callback=lambda info: report({"i": info["i"], "denoised": info["pred"]}))


# ---------------------------------------------------------------------------------------
# The t2i file: save, detect, load, a tiny one
# ---------------------------------------------------------------------------------------


def save_maskgit(net: TokenTransformer, vq: VQAutoencoder, cfg: MaskGITConfig, path: str | Path) -> None:
    """The transformer, the tokenizer and the resolved config in one safetensors file."""
    save_token_model(net, vq, dataclasses.asdict(cfg), path, SYSTEM_NAME)


def load(path: Path, dtype: torch.dtype = torch.float32) -> MaskGITPipeline:
    """A MaskGIT file (or a folder holding it as model.safetensors) -> MaskGITPipeline; the
    transformer in `dtype` (float32 unless asked), the tokenizer in float32."""
    file = system_file(path)
    net, vq, cfg = load_token_model(file, SYSTEM_NAME, "a t2i MaskGIT file", MaskGITConfig.from_dict)
    name = file.parent.name if file.name == "model.safetensors" else file.stem
    pipe = MaskGITPipeline(net, vq, load_text_encoder(cfg.text_encoder, cfg.text_length), cfg, name=name)
    if dtype != torch.float32:
        pipe.unet.to(dtype)
    return pipe


def randomize(net: nn.Module) -> None:
    """Give the zero-initialised image head random weights, as a trained one has (a random tiny
    model whose logits were all equal would ignore the prompt and the guidance)."""
    with torch.no_grad():
        net.to_logits.weight.normal_(0, net.cfg.width ** -0.5)  # logits of about unit spread


def tiny_tokenizer(seed: int = 0) -> VQAutoencoder:
    """A random tokenizer of the tiny preset (16x16 images, 4x4 codes of 32), codebook spread out so
    that different codes decode to different pixels."""
    torch.manual_seed(seed)
    vq = VQAutoencoder(replace(VQ_CONFIGS["tiny"]))
    with torch.no_grad():
        vq.quantize.codebook.normal_()
    return vq.eval()


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random model of the tiny presets (16x16 images) as folder/model.safetensors."""
    vq = tiny_tokenizer(seed)
    cfg = MaskGITConfig(net=replace(TOKEN_TRANSFORMER_PRESETS["tiny"]), vq=vq.cfg, steps=4)
    net = TokenTransformer(cfg.net)
    randomize(net)
    folder.mkdir(parents=True, exist_ok=True)
    save_maskgit(net, vq, cfg, folder / "model.safetensors")
    return folder / "model.safetensors"


SYSTEM = System(
    name=SYSTEM_NAME,
    description="MaskGIT: a masked token transformer with its VQ tokenizer, a t2i .safetensors with a "
                "t2i_config (or a folder holding it as model.safetensors)",
    detect=lambda path: is_system_file(Path(path), SYSTEM_NAME),
    load=load,
    write_tiny=write_tiny,
)
