"""t2i's layout model of the 64x64 shapes world (issue 17): plan a layout, then render it.

Two learned stages, as the two-stage systems that first plan a layout and then draw it
(LayoutGPT, LLM-grounded diffusion; LDM's layout-to-image, seed 003 3.4):
- a planner (`t2i.layout.planner`, a small transformer on MiniLM's token states, trained on the
  world's scene truth) samples a layout from the caption: objects with a box and a phrase;
- a renderer, the default model's latent diffusion recipe (`t2i.systems.shapes_ldm`) with a
  `LayoutUNet`: each box's phrase embedding painted into a spatial map the U-Net reads beside
  the caption's cross-attention.
A user may give the layout instead (`request.layout`); the planner is then skipped. Each image's
PNG parameters record the layout it was drawn from, so it can be reproduced without the planner.

Files: a folder with `model.safetensors` (the renderer: `vae.*` + `unet.*`, its config in the
metadata, system "shapes_layout") and `planner.safetensors` (optional: without it the model
draws given layouts only). The text encoder is the frozen MiniLM, as for the default model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.io import (
    CheckpointError,
    is_system_file,
    model_name,
    save_with_config,
    system_file,
)
from t2i.checkpoints.limits import check_schedule, load_system_file
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.layout.captions import layout_caption
from t2i.layout.planner import LayoutPlanner, planner_config, to_layout
from t2i.layout.spec import Layout, as_layout
from t2i.nets.layout_unet import LayoutConfig, LayoutUNet, pack_layout
from t2i.request_warnings import resolved_request
from t2i.systems.base import Capabilities, GenerationRequest, GenerationResult, ShippedModel, System, per_image
from t2i.systems.latent_diffusion import GenerationDefaults, LatentDiffusionPipeline
from t2i.systems.shapes_ldm import ShapesLDMConfig, load_text_encoder, preset_config

SYSTEM_NAME = "shapes_layout"
LAYOUT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "layout"


@dataclass
class ShapesLayoutConfig:
    """The renderer: the default model's config (autoencoder, U-Net, schedule, sampling defaults)
    plus how its U-Net reads layouts."""

    ldm: ShapesLDMConfig = field(default_factory=ShapesLDMConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    max_objects: int = 4
    # Classifier-free guidance pushes away from the empty caption; with guide_layout the
    # unconditional branch also loses the layout, so guidance strengthens the boxes too.
    guide_layout: bool = False
    planner_temperature: float = 1.0
    # The renderer reads the layout's complete caption (`layout_caption`), not the user's prompt:
    # the prompt is rewritten by the layout stage (DALL-E 3's recaptioning).
    recaption: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapesLayoutConfig:
        d = dict(d)
        return cls(ldm=ShapesLDMConfig.from_dict(d.pop("ldm")), layout=LayoutConfig(**d.pop("layout")), **d)


class ShapesLayoutModel(nn.Module):
    """The renderer's weights: autoencoder + layout U-Net (+ their config)."""

    def __init__(self, cfg: ShapesLayoutConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.ldm.vae)
        self.unet = LayoutUNet(cfg.ldm.unet, cfg.layout)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """`vae.*` (float32) and `unet.*` (in `dtype`: float16 halves the shipped file), the config in
        the metadata. `load` gives float32 back."""
        state = {f"vae.{k}": v.detach().float() for k, v in self.vae.state_dict().items()}
        state.update({f"unet.{k}": v.detach().to(dtype) for k, v in self.unet.state_dict().items()})
        save_with_config(state, path, self.cfg.to_dict(), SYSTEM_NAME)

    @classmethod
    def load(cls, path: str | Path) -> ShapesLayoutModel:
        """Rebuild from a file written by `save`: config checked against sane bounds and the network,
        built on the meta device, against the file's tensors before anything is allocated."""
        def check(cfg: ShapesLayoutConfig) -> None:
            check_schedule(cfg.ldm.schedule, f"{path}: schedule")
            if not 1 <= cfg.max_objects <= 64:
                raise CheckpointError(f"{path}: max_objects {cfg.max_objects} is outside 1..64")

        return load_system_file(path, SYSTEM_NAME, "a shapes layout model file", ShapesLayoutConfig.from_dict, cls,
                                lambda c: {"vae": c.ldm.vae, "unet": c.ldm.unet}, check)


class PhraseEncoder:
    """Phrases -> (N, E) embeddings: the text encoder's pooled output (MiniLM: the masked mean of its
    token states), memoised, since a model sees few distinct phrases."""

    def __init__(self, text_encoder: nn.Module) -> None:
        self.text_encoder = text_encoder
        self.cache: dict[str, torch.Tensor] = {}
        self.max_cached = 4096

    def __call__(self, phrases: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(phrases) if p not in self.cache]
        if len(self.cache) + len(new) > self.max_cached:  # a server fed arbitrary phrases stays bounded
            self.cache.clear()
        if new:
            pooled = self.text_encoder.encode(new).pooled
            self.cache.update({p: v.float() for p, v in zip(new, pooled, strict=True)})
        if not phrases:
            return torch.zeros(0, self.text_encoder.pooled_dim)
        return torch.stack([self.cache[p] for p in phrases])


def encode_layouts(layouts: list[Layout], phrases: PhraseEncoder, max_objects: int) -> torch.Tensor:
    """Layouts -> the LayoutUNet's (B, max_objects, 5 + E) input."""
    return pack_layout([[o.box for o in lay.objects] for lay in layouts],
                       [phrases([o.phrase for o in lay.objects]) for lay in layouts], max_objects)


def planner_sampler(planner: LayoutPlanner, text_encoder: nn.Module,
                    temperature: float = 1.0) -> Callable[[str, int], Layout]:
    """(prompt, seed) -> the layout the planner samples for it from that seed."""

    def plan(prompt: str, seed: int) -> Layout:
        generator = torch.Generator().manual_seed(seed)
        return to_layout(planner.plan([prompt], generator, temperature, text_encoder=text_encoder)[0])

    return plan


class ShapesLayoutPipeline(LatentDiffusionPipeline):
    """The latent diffusion pipeline with a layout: `request.layout`, or one the planner samples per
    image from its prompt and seed (the planner draws from the image's own seed, so a seed gives the
    same picture)."""

    def __init__(self, model: ShapesLayoutModel, text_encoder: nn.Module, planner: LayoutPlanner | None = None,
                 name: str = "t2i-shapes-layout") -> None:
        c = model.cfg.ldm
        defaults = GenerationDefaults(sampler=c.sampler, steps=c.steps, guidance=c.guidance,
                                      width=c.image_size, height=c.image_size)
        super().__init__(model.unet, model.vae, text_encoder, c.schedule, name=name, family=SYSTEM_NAME,
                         defaults=defaults)
        self.prompt_check = out_of_world_warning
        self.planner = planner  # None: the caption alone unless a layout is given
        self.planner_temperature = model.cfg.planner_temperature
        self.phrases = PhraseEncoder(text_encoder)
        self.max_objects = model.cfg.max_objects
        self.guide_layout = model.cfg.guide_layout
        self.recaption = model.cfg.recaption
        self._backgrounds: dict[str, str] = {}  # prompt -> the planner's background, for recaptions

    @property
    def capabilities(self) -> Capabilities:
        caps = super().capabilities
        return replace(caps, options=caps.options | {"layout"})

    def run(self, request: GenerationRequest) -> GenerationResult:
        """One batched run in which image i is drawn from layouts[i]: the given layout for every image,
        or each image's own layout, planned from its prompt and seed."""
        size = resolved_request(self, request)  # a layout in pixels is read on the image's size
        given = as_layout(request.layout, size.width, size.height, self.max_objects)
        prompts, negatives, seeds = per_image(request.prompt, request.negative_prompt, request.seed,
                                              request.num_images)
        warnings = []
        if given is not None:
            layouts = [given] * len(prompts)
        elif self.planner is not None:
            layouts = [self.planned_layout(p, s) for p, s in zip(prompts, seeds, strict=True)]
        else:  # the renderer's no-layout mode (its layout dropout): the caption alone
            layouts = [Layout(())] * len(prompts)
            warnings.append(f"{self.name} has no layout planner: drawn from the caption alone "
                            "(give a layout to place the objects)")
        result = super().run(replace(request, prompt=prompts, negative_prompt=negatives, seed=seeds,
                                     num_images=1, layout=layouts))
        result.warnings += warnings
        return result

    def planned_layout(self, prompt: str, seed: int) -> Layout | None:
        """The layout `run` draws the image of (prompt, seed) from when no layout is given (None
        without a planner): a pure function of the two, so a server can record it in the PNG
        parameters of an image it stopped early."""
        if self.planner is None:
            return None
        return planner_sampler(self.planner, self.text_encoder, self.planner_temperature)(prompt, seed)

    def _background(self, layout: Layout, prompt: str) -> str | None:
        """The layout's background, else the one the planner reads in the prompt (recaptioning names
        the background; a user's layout may leave it out). Deterministic: the planner's first draw."""
        if layout.background is not None or self.planner is None:
            return layout.background
        if prompt not in self._backgrounds:
            if len(self._backgrounds) >= 4096:  # bounded for a long-running server
                self._backgrounds.clear()
            plan = self.planner.plan([prompt], torch.Generator().manual_seed(0), text_encoder=self.text_encoder)
            self._backgrounds[prompt] = plan[0].background
        return self._backgrounds[prompt]

    def extra_conditioning(self, request: GenerationRequest, n: int, cond: dict,
                           uncond: dict | None) -> tuple[dict, dict | None]:
        layouts = request.layout
        assert isinstance(layouts, list) and len(layouts) == n  # run() gives one per image
        layout = encode_layouts(layouts, self.phrases, self.max_objects)  # (n, max_objects, 5 + E)
        cond = {**cond, "layout": layout}
        if self.recaption:
            prompts = [request.prompt] * n if isinstance(request.prompt, str) else request.prompt
            captions = [layout_caption(replace(lay, background=self._background(lay, p)))
                        for lay, p in zip(layouts, prompts, strict=True)]
            cond["context"] = self.text_encoder.encode(captions).context.to(cond["context"].dtype)
        if uncond is not None:
            uncond = {**uncond, "layout": torch.zeros_like(layout) if self.guide_layout else layout}
        return cond, uncond


def is_layout_model(path: str | Path) -> bool:
    """A folder (or its model.safetensors) written by `ShapesLayoutModel.save`."""
    return is_system_file(path, SYSTEM_NAME)


def load_layout_model(path: str | Path, dtype: torch.dtype = torch.float32) -> ShapesLayoutPipeline:
    """A shapes layout folder -> ShapesLayoutPipeline (planner from planner.safetensors beside it, if any)."""
    file = system_file(path)
    model = ShapesLayoutModel.load(file)
    text_encoder = load_text_encoder(model.cfg.ldm)
    planner_file = file.parent / "planner.safetensors"
    planner = LayoutPlanner.load(planner_file) if planner_file.is_file() else None
    pipe = ShapesLayoutPipeline(model, text_encoder, planner, name=model_name(file))
    if dtype != torch.float32:
        pipe.unet.to(dtype)
        pipe.vae.to(dtype)
    return pipe


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random renderer of the tiny presets (16x16 images) as `folder/model.safetensors`, and a random
    tiny planner beside it."""
    torch.manual_seed(seed)
    ldm = preset_config("tiny", "tiny")
    ldm.image_size = ldm.vae.sample_size
    folder.mkdir(parents=True, exist_ok=True)
    ShapesLayoutModel(ShapesLayoutConfig(ldm=ldm)).save(folder / "model.safetensors")
    LayoutPlanner(planner_config("tiny")).save(folder / "planner.safetensors")
    return folder / "model.safetensors"


SYSTEM = System(
    name=SYSTEM_NAME,
    description="t2i's layout model of the shapes world: a planner (caption -> boxes) and a layout-conditioned "
                "latent diffusion renderer; a folder with model.safetensors (+ planner.safetensors)",
    detect=is_layout_model,
    load=lambda path, dtype=torch.float32: load_layout_model(path, dtype),
    write_tiny=write_tiny_model,
    shipped=(ShippedModel("t2i-shapes-layout", LAYOUT_MODEL_DIR, "the built-in model: plans a layout from the "
                          "prompt, then draws it; 64x64 pictures of the shapes world (docs/SHAPES_WORLD.md)",
                          default=True, card=LAYOUT_MODEL_DIR / "MODEL_CARD.md"),),
)
