"""eDiff-I's ensemble of expert denoisers (Balaji et al. 2022, sec. 4.1) on t2i's shapes latent diffusion.

A model of this family is a folder: one shapes-LDM file (`t2i.systems.shapes_ldm`) per expert, each a
copy of one base model fine-tuned on an interval of the training timesteps (`t2i train ediffi`, the
paper's binary-tree fine-tuning, `t2i.train.ediffi`, writes one as OUT/model), and `ediffi.json`
naming every expert's file and interval:

    {"format": "t2i_ediffi", "experts": [{"file": "expert_t0000-0500.safetensors",
     "timesteps": [0, 500], "sigmas": [0.0, 1.04]}, ...], ...}

timesteps [lo, hi) are what the expert was trained on and decide the switch; sigmas are the same
interval as noise levels (null: unbounded), written for the reader. The intervals tile the schedule.
The experts share the config, the autoencoder, the text encoder and the schedule (the config is
checked on loading); only their U-Nets' weights differ. Generation is the latent-diffusion
pipeline's, with the denoiser of each step chosen by its sigma (`t2i.diffusion.experts.SigmaExperts`),
so one sampler run crosses the boundaries with its history intact.

Paint-with-words (eDiff-I sec. 4.3) works as on any latent model: the pipeline sets its bias on the first
expert's cross-attention layers, and every other expert borrows it for its own calls (`BorrowedLogitBias`).
What the pipeline does not offer (refused by name through its capabilities): DeepCache, ControlNet and an
SDXL-style refiner, which wrap one U-Net. `t2i.load(..., precision="int8")` quantizes `pipe.unet`, the first
expert alone; the others stay float (bf16 where the CPU computes it natively).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.checkpoints.io import CheckpointError, read_json_object
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.diffusion.experts import SigmaExperts, sigma_interval, timestep_boundaries
from t2i.diffusion.paint_with_words import cross_attentions
from t2i.nets.attention import Attention
from t2i.nets.unet import UNet
from t2i.samplers.diffusers_plan import SamplingPlan
from t2i.systems.base import Capabilities, GenerationDefaults, GenerationRequest, GenerationResult, System
from t2i.systems.latent_diffusion import (
    LATENT_DIFFUSION_OPTIONS,
    REGION_OPTIONS,
    CastInputs,
    LatentDiffusionPipeline,
    stop_polling,
)
from t2i.systems.shapes_ldm import ShapesLDM, load_text_encoder, preset_config

NAME = "ediffi"
MANIFEST = "ediffi.json"
FORMAT = "t2i_ediffi"
# Options that wrap or hook a single U-Net (see the module docstring).
SINGLE_UNET_OPTIONS = frozenset({"deepcache", "controlnet", "control_image", "control_scale", "refiner",
                                 "refiner_start"})
OPTIONS = (LATENT_DIFFUSION_OPTIONS | REGION_OPTIONS) - SINGLE_UNET_OPTIONS


def expert_file_name(interval: tuple[int, int]) -> str:
    lo, hi = interval
    return f"expert_t{lo:04d}-{hi:04d}.safetensors"


def write_manifest(folder: Path, intervals: Sequence[tuple[int, int]], alphas_cumprod: torch.Tensor,
                   **about: Any) -> Path:
    """`folder/ediffi.json` for experts saved as `expert_file_name(interval)` in `folder` (atomically:
    the folder is a model only once the file is whole). about: extra keys recorded as they are
    (how the tree was trained)."""
    timestep_boundaries(intervals, alphas_cumprod)  # checks that they tile the schedule
    experts = [{"file": expert_file_name(iv), "timesteps": list(iv), "sigmas": list(sigma_interval(iv, alphas_cumprod))}
               for iv in intervals]
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "experts": experts, **about}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> list[tuple[Path, tuple[int, int]]]:
    """(expert file, timestep interval) of every expert of a folder, lowest noise first; CheckpointError for
    a manifest that is malformed or names a file outside the folder or missing."""
    manifest = read_json_object(Path(folder) / MANIFEST, "an eDiff-I experts manifest")
    experts = manifest.get("experts")
    if manifest.get("format") != FORMAT or not isinstance(experts, list) or not experts:
        raise CheckpointError(f"{folder / MANIFEST}: not a {FORMAT} manifest with a list of experts")
    out = []
    for i, e in enumerate(experts):
        iv = e.get("timesteps") if isinstance(e, dict) else None
        name = e.get("file") if isinstance(e, dict) else None
        if not (isinstance(name, str) and isinstance(iv, list) and len(iv) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in iv)):
            raise CheckpointError(f"{folder / MANIFEST}: expert {i} needs a file name and timesteps [lo, hi]")
        file = Path(folder) / name
        if Path(name).name != name or not file.is_file():
            raise CheckpointError(f"{folder / MANIFEST}: expert {i}'s file {name!r} is not a file in the folder")
        out.append((file, (iv[0], iv[1])))
    return sorted(out, key=lambda fe: fe[1])


class BorrowedLogitBias(nn.Module):
    """An expert's network that runs with the paint-with-words bias the first expert's cross-attention layers
    hold when it is called (the pipeline sets it there, on `pipe.unet`'s layers, for the length of a guided
    call): copied layer by layer (the experts are copies of one network) and cleared afterwards."""

    def __init__(self, net: nn.Module, source: Sequence[Attention], own: Sequence[Attention]) -> None:
        super().__init__()
        if len(source) != len(own):
            raise ValueError(f"{len(own)} cross-attention layers borrow from {len(source)}")
        self.net, self.source, self.own = net, list(source), list(own)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        for src, dst in zip(self.source, self.own, strict=True):
            dst.logit_bias = src.logit_bias
        try:
            return self.net(x, t, **cond)
        finally:
            for dst in self.own:
                dst.logit_bias = None


class EDiffIPipeline(LatentDiffusionPipeline):
    """A latent diffusion pipeline over several expert U-Nets, one per timestep interval.

    Args:
        experts: the U-Nets, lowest noise first (the first is also `self.unet`: shapes, dtype, checks).
        intervals: their timestep intervals [lo, hi), tiling the schedule.
        vae, text_encoder, schedule, **kwargs: as LatentDiffusionPipeline's.
    """

    def __init__(self, experts: Sequence[UNet], intervals: Sequence[tuple[int, int]], vae: nn.Module,
                 text_encoder: Any, schedule: Any, **kwargs: Any) -> None:
        if len(experts) != len(intervals):
            raise ValueError(f"{len(experts)} experts for {len(intervals)} intervals")
        super().__init__(experts[0], vae, text_encoder, schedule, family=NAME, **kwargs)  # type: ignore[arg-type]
        self.experts, self.intervals = list(experts), list(intervals)
        self.boundaries = timestep_boundaries(self.intervals, schedule.alphas_cumprod())

    @property
    def capabilities(self) -> Capabilities:
        own = super().capabilities
        return dataclasses.replace(own, options=own.options & OPTIONS)  # every other field as the base's

    def sampling_denoiser(self, plan: SamplingPlan, net: nn.Module) -> Callable:
        """Each step's denoiser chosen by its sigma: the first expert as the pipeline made it (`net`),
        the others as float32 samplers call them, with the first one's paint-with-words bias."""
        source = cross_attentions(self.unet)
        nets = [net, *(BorrowedLogitBias(CastInputs.around(u), source, cross_attentions(u)) for u in self.experts[1:])]
        return SigmaExperts([plan.denoiser(n) for n in nets], self.boundaries)

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        # the base class polls should_stop inside the first expert and the VAE; the others here
        with stop_polling(request.should_stop, *self.experts[1:]):
            return super().run(request)


def experts_folder_name(folder: Path) -> str:
    """A folder's model name: its own, or its run's for `t2i train ediffi`'s OUT/model."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "model" else folder.name


def detect(path: Path) -> bool:
    """A folder whose ediffi.json says it is an experts folder (the manifest only, never the weights)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        return read_json_object(path / MANIFEST, "an eDiff-I experts manifest").get("format") == FORMAT
    except (ValueError, OSError):
        return False


def load(path: Path, dtype: torch.dtype = torch.float32) -> EDiffIPipeline:
    """An experts folder -> EDiffIPipeline (text encoder: the frozen MiniLM the experts' config names)."""
    folder = Path(path)
    entries = read_manifest(folder)
    models = [ShapesLDM.load(file) for file, _ in entries]
    first_vae = models[0].vae.state_dict()
    for (file, _), m in zip(entries[1:], models[1:], strict=True):
        if m.cfg.to_dict() != models[0].cfg.to_dict():
            raise CheckpointError(f"{file}: its config differs from {entries[0][0].name}'s; the experts are copies "
                                  "of one model and differ in their U-Net's weights only")
        if any(not torch.equal(v, first_vae[k]) for k, v in m.vae.state_dict().items()):  # only the first decodes
            raise CheckpointError(f"{file}: its autoencoder differs from {entries[0][0].name}'s; the experts share "
                                  "one latent space")
        del m.vae  # one autoencoder in memory, the first expert's
    c = models[0].cfg
    defaults = GenerationDefaults(sampler=c.sampler, steps=c.steps, guidance=c.guidance, width=c.image_size,
                                  height=c.image_size)
    try:
        pipe = EDiffIPipeline([m.unet for m in models], [iv for _, iv in entries], models[0].vae,
                              load_text_encoder(c), c.schedule, name=experts_folder_name(folder), defaults=defaults)
    except ValueError as e:  # intervals that do not tile the schedule
        raise CheckpointError(f"{folder / MANIFEST}: {e}") from None
    pipe.prompt_check = out_of_world_warning
    if dtype != torch.float32:
        for net in (*pipe.experts, pipe.vae):
            net.to(dtype)
    return pipe


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """`folder/tiny-ediffi`: two random experts of the tiny shapes presets (16x16 images) split at t = 500."""
    torch.manual_seed(seed)
    cfg = preset_config("tiny", "tiny")
    cfg.image_size = cfg.vae.sample_size
    out = folder / "tiny-ediffi"
    out.mkdir(parents=True, exist_ok=True)
    low = ShapesLDM(cfg)
    high = ShapesLDM(cfg)
    high.vae.load_state_dict(low.vae.state_dict())
    intervals = [(0, 500), (500, cfg.schedule.num_train_timesteps)]
    for model, iv in zip((low, high), intervals, strict=True):
        model.save(out / expert_file_name(iv))
    write_manifest(out, intervals, cfg.schedule.alphas_cumprod())
    return out


SYSTEM = System(
    name=NAME,
    description="eDiff-I expert denoisers: a folder of shapes-LDM experts, each for a timestep interval, named by "
                "its ediffi.json (`t2i train ediffi`)",
    detect=detect,
    load=load,
    write_tiny=write_tiny,
)
