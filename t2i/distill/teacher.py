"""The teacher of a distillation run and the model its student ships as.

A teacher is one of t2i's own latent diffusion models: the plain shapes LDM (`shapes_ldm`) or the
layout renderer (`shapes_layout`, whose U-Net also reads a layout). `Teacher` hides the difference
from the distillation losses: it draws the family's training data (the scenes, captions and, for
the renderer, the truth layouts it was trained on), encodes it into the network's conditioning
(`cond`) and the conditioning guidance pushes away from (`uncond`: the empty caption, and for a
renderer with `guide_layout` no layout either, as its pipeline guides), and writes a student as a
normal model file of the teacher's family (same loader) whose defaults are the fast setting.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from t2i.checkpoints.io import system_file
from t2i.nets.unet import UNet, UNetConfig
from t2i.systems.shapes_ldm import ShapesLDM, ShapesLDMConfig, load_text_encoder
from t2i.train.distributed import DistInfo
from t2i.train.loop import batch_indices

FAMILIES = ("shapes_ldm", "shapes_layout")
STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}  # safetensors' names
# Width of the student's guidance-scale embedding (LCM's and diffusers' LatentConsistencyModelPipeline's).
GUIDANCE_EMBED_DIM = 256
# The sample grids' prompts: a few of the judge families' kinds.
GRID_PROMPTS = ["a red circle", "a blue square", "a small purple cross on the left",
                "a red circle above a blue square", "three blue circles", "a green circle and a yellow square",
                "a pink circle on a gray background", "an orange cross below a cyan circle"]


@dataclass
class FastDefaults:
    """What a student's model file asks a request that leaves them out (its GenerationDefaults)."""

    sampler: str = "lcm"
    steps: int = 4
    guidance: float = 1.0  # an LCM with the w-embedding: the teacher's guidance, embedded


@dataclass
class Batch:
    """One step's frozen inputs. z: (B, C, h, w) scaled latents; cond / uncond: network keyword
    arguments (context (B, T, D), layout (B, N, 5 + E) for the renderer); pooled: (B, D) caption
    embeddings (the ADD discriminator's condition)."""

    z: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    pooled: torch.Tensor


def teacher_file(model: str) -> tuple[str, Path]:
    """(family, weight file) of a teacher (a name, file or folder); ValueError naming what is wrong with it.
    Reads headers only: a run checks its teacher before it starts."""
    from t2i.systems.registry import resolve

    if not model:
        raise ValueError("--teacher is required: the model to distil, e.g. t2i/assets/layout (a shapes_ldm or "
                         "shapes_layout model)")
    system, path = resolve(model)
    if system.name not in FAMILIES:
        kind = ("a latent diffusion model of another family: distillation reads t2i's own shapes models for now"
                if system.name == "stable_diffusion" else "not a latent diffusion model")
        raise ValueError(f"--teacher {model}: a {system.name} model is {kind} (teachers: {', '.join(FAMILIES)})")
    return system.name, system_file(path)


class Teacher:
    """A frozen shapes-family latent diffusion model and what distilling it needs.

    Raises ValueError naming the family for a model that is not a t2i latent diffusion model
    (a pixel DDPM, a token model, a diffusers folder), and for one already distilled with a
    guidance embedding (its guidance is no longer a classifier-free guidance batch to distil).
    """

    def __init__(self, model: str, text_encoder: nn.Module | None = None) -> None:
        self.family, self.file = teacher_file(model)
        self.layout = self.family == "shapes_layout"
        if self.layout:
            from t2i.systems.shapes_layout import ShapesLayoutModel

            self.model: nn.Module = ShapesLayoutModel.load(self.file)
            self.ldm_cfg: ShapesLDMConfig = self.model.cfg.ldm
        else:
            self.model = ShapesLDM.load(self.file)
            self.ldm_cfg = self.model.cfg
        if self.ldm_cfg.unet.time_cond_proj_dim is not None:
            raise ValueError(f"--teacher {model}: its U-Net already embeds the guidance scale (a distilled LCM); "
                             "distil the model it came from")
        self.unet: UNet = self.model.unet.requires_grad_(False).eval()
        self.vae = self.model.vae.requires_grad_(False).eval()
        self.schedule = self.ldm_cfg.schedule
        with safe_open(str(self.file), framework="pt") as f:  # the student's U-Net is stored as the teacher's is
            self.unet_dtype = STORED_DTYPES.get(f.get_slice("unet.conv_in.weight").get_dtype(), torch.float32)
        self.text = text_encoder or load_text_encoder(self.ldm_cfg)
        self.planner_file = self.file.parent / "planner.safetensors"
        self.phrases = None
        if self.layout:
            from t2i.systems.shapes_layout import PhraseEncoder

            self.phrases = PhraseEncoder(self.text)
        self._empty: torch.Tensor | None = None  # the empty caption's context (1, T, D), encoded once

    @property
    def guidance(self) -> float:
        """The teacher's default classifier-free guidance scale."""
        return float(self.ldm_cfg.guidance)

    @property
    def image_size(self) -> int:
        return self.ldm_cfg.image_size

    # ------------------------------------------------------------------ data

    def data(self, seed: int, background_p: float | None, log: Callable[[str], None]) -> Callable:
        """(position, batch_size, info) -> (images (B, 3, S, S) in [-1, 1], captions, truth layouts or None):
        the data the teacher was trained on (the shapes world; for the renderer its layouts, recaptioned
        when the renderer reads complete captions)."""
        if not self.layout:
            from t2i.train.data import open_data

            source = open_data("shapes", None, self.image_size, seed, log, background_p)
            return lambda position, n, info: (*source.batch(position, n, info)[:2], None)
        from t2i.data.shapes.sampling import BACKGROUND_P
        from t2i.train.layout_ldm import layout_batch

        p = BACKGROUND_P if background_p is None else background_p
        recaption = self.model.cfg.recaption

        def batch(position: int, n: int, info: DistInfo):
            x, captions, layouts = layout_batch(seed, batch_indices(position, n, info, None, seed), p, recaption)
            if x.shape[-1] != self.image_size:  # the world renders 64 px; a smaller model (tests) sees it pooled
                x = F.adaptive_avg_pool2d(x, self.image_size)
            return x, captions, layouts

        return batch

    @torch.no_grad()
    def encode(self, x: torch.Tensor, captions: list[str], layouts: list | None,
               gen: torch.Generator) -> Batch:
        """Images, captions (and layouts) -> the step's Batch; the posterior sample is drawn from `gen`."""
        z = self.vae.scale(self.vae.encode(x).sample(gen))  # (B, C, h, w)
        enc = self.text.encode(captions)
        if self._empty is None:
            self._empty = self.text.encode([""]).context.float()
        context = enc.context.float()  # (B, T, D)
        cond = {"context": context}
        uncond = {"context": self._empty.expand_as(context)}
        if self.layout:
            from t2i.systems.shapes_layout import encode_layouts

            layout = encode_layouts(layouts, self.phrases, self.model.cfg.max_objects)  # (B, N, 5 + E)
            cond["layout"] = layout
            uncond["layout"] = torch.zeros_like(layout) if self.model.cfg.guide_layout else layout
        pooled = enc.pooled.float() if enc.pooled is not None else context.mean(1)  # (B, D)
        return Batch(z, cond, uncond, pooled)

    # ------------------------------------------------------------------ students

    def student_unet(self, embed_guidance: bool) -> UNet:
        """A trainable copy of the teacher's U-Net; with embed_guidance it also takes LCM's guidance-scale
        embedding (`time_cond_proj_dim`), whose projection starts at zero so the student starts exactly
        as the teacher (the diffusers LCM script leaves it random: the student then starts off the teacher)."""
        if not embed_guidance:
            return copy.deepcopy(self.unet).requires_grad_(True).train()
        cfg = dataclasses.replace(self.ldm_cfg.unet, time_cond_proj_dim=GUIDANCE_EMBED_DIM)
        unet = (type(self.unet)(cfg, self.unet.layout_cfg) if self.layout else UNet(cfg))
        missing, unexpected = unet.load_state_dict(self.unet.state_dict(), strict=False)
        assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
        nn.init.zeros_(unet.time_embedding.cond_proj.weight)
        return unet.train()

    def student_model(self, unet_cfg: UNetConfig, state: dict[str, torch.Tensor], defaults: FastDefaults) -> nn.Module:
        """The teacher's model (same family, autoencoder and schedule) with a U-Net of `unet_cfg` holding
        `state`, and the fast defaults."""
        ldm = dataclasses.replace(self.ldm_cfg, unet=dataclasses.replace(unet_cfg), sampler=defaults.sampler,
                                  steps=defaults.steps, guidance=defaults.guidance)
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the run's RNG as it was
            if self.layout:
                from t2i.systems.shapes_layout import ShapesLayoutModel

                model = ShapesLayoutModel(dataclasses.replace(self.model.cfg, ldm=ldm))
            else:
                model = ShapesLDM(ldm)
        model.vae.load_state_dict(self.vae.state_dict())
        model.unet.load_state_dict(state)
        return model.eval()

    def save_student(self, model: nn.Module, folder: Path) -> Path:
        """`folder/model.safetensors` (loaded by the teacher's family), with the teacher's layout planner
        beside it when it has one, so `--model folder` plans layouts as the teacher does."""
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "model.safetensors", self.unet_dtype)
        if self.layout and self.planner_file.is_file():
            shutil.copyfile(self.planner_file, folder / "planner.safetensors")
        return folder / "model.safetensors"

    def pipeline(self, model: nn.Module):
        """A pipeline over a student model (its defaults), for the sample grids."""
        if self.layout:
            from t2i.layout.planner import LayoutPlanner
            from t2i.systems.shapes_layout import ShapesLayoutPipeline

            planner = LayoutPlanner.load(self.planner_file) if self.planner_file.is_file() else None
            return ShapesLayoutPipeline(model, self.text, planner, name="student")
        return model.pipeline(self.text, name="student")

    @torch.no_grad()
    def grid(self, model: nn.Module, steps: int | None = None):
        """GRID_PROMPTS drawn by a student model at its own defaults (seed 0 each)."""
        from t2i.imageio import from_pil
        from t2i.train.fit import Grid

        pipe = self.pipeline(model)
        images = [pipe.generate(p, seed=0, steps=steps).images[0] for p in GRID_PROMPTS]
        return Grid(torch.cat([from_pil(im, im.size) for im in images]), list(GRID_PROMPTS))
