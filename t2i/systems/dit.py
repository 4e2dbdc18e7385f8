"""DiT (Peebles & Xie 2023): a class-conditional diffusion transformer on SD-VAE latents.

The prompt is a class name: one of the model's `id2label` names, or any comma-separated synonym in
one (diffusers' DiTPipeline.get_label_ids: "tench, Tinca tinca" answers to both); an unknown name is
refused naming the known ones. Guidance is classifier-free against the null class (DiT sec. 3.1,
guidance on eps; the network's learned-variance half is dropped at the edge by `LearnedVariance`, and
guiding x0 equals guiding eps since the denoiser is affine in eps).

A prompt that is not a class name answers to the one class all of whose words it holds ("a picture
of a large green circle" -> "a green circle", with a warning); none or several are refused.

Layouts: a diffusers DiTPipeline folder (`t2i.checkpoints.diffusers_dit`; `write_tiny` writes one) and
t2i's own file, one safetensors holding `vae.*` and `net.*` with the resolved `LatentTransformerConfig`
in its metadata (what `t2i train dit` exports; `LatentTransformer` is shared with the PixArt family).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from t2i.autoencoders.kl import AUTOENCODER_KL_CONFIGS, AutoencoderKL, AutoencoderKLConfig
from t2i.checkpoints.diffusers_dit import (
    PIPELINE,
    dit_config_from_diffusers,
    dit_state_dict_from_diffusers,
    is_diffusers_dit,
    read_id2label,
    write_dit_transformer,
)
from t2i.checkpoints.diffusers_folder import file_tensors, load_vae, read_config_file, read_schedule
from t2i.checkpoints.diffusers_nets import vae_config_to_diffusers
from t2i.checkpoints.diffusers_scheduler import write_scheduler_config
from t2i.checkpoints.io import (
    CheckpointError,
    find_weights,
    is_system_file,
    load_state_dict,
    model_name,
    save_with_config,
    system_file,
)
from t2i.checkpoints.limits import build_checked, check_schedule, fill, load_system_file
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.precond import LearnedVariance
from t2i.diffusion.schedules import ScheduleConfig
from t2i.imageio import request_parameters, to_pil
from t2i.nets.cast_inputs import CastInputs
from t2i.nets.dit import DIT_PRESETS, DiT, DiTConfig
from t2i.quantize import precision_of
from t2i.samplers.diffusers_plan import prepare_sampling
from t2i.samplers.sampling import SAMPLERS
from t2i.seeds import seed_generators, seed_noise
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    StepReport,
    System,
    UnsupportedPrompt,
    check_sampling_request,
    per_image,
    stop_polling,
)

OPTIONS = frozenset({"steps", "sampler", "guidance", "width", "height"})  # what run() honours


def class_names(id2label: dict[int, str]) -> dict[str, int]:
    """name -> class id: each label and each of its comma-separated synonyms, stripped (DiTPipeline.labels)."""
    names: dict[str, int] = {}
    for cid, label in id2label.items():
        names[label.strip()] = cid
        for part in label.split(","):
            names[part.strip()] = cid
    return names


class DiTPipeline(RequestMethods):
    """A DiT, its VAE and schedule, and the class names.

    Args:
        net: the DiT (learned variance or not) on scaled VAE latents.
        vae: decodes vae.unscale(latents) to images in [-1, 1].
        schedule: the training schedule and sampler settings (scheduler_config.json).
        id2label: class id -> name(s); without it the prompt must be a class id ("207").
    """

    family = "dit"

    def __init__(self, net: DiT, vae: AutoencoderKL, schedule: ScheduleConfig, id2label: dict[int, str] | None = None,
                 *, name: str = "dit", defaults: GenerationDefaults | None = None) -> None:
        # `unet`, as the other families name the denoising network: t2i.load's int8 quantizes pipe.unet
        self.unet, self.vae, self.schedule = net, vae, schedule
        self.id2label = dict(id2label or {})
        self.labels = class_names(self.id2label)
        self.name = name
        self.factor = 2 ** (len(vae.cfg.block_channels) - 1)
        size = net.cfg.sample_size * self.factor
        self.defaults = defaults or GenerationDefaults(sampler="ddim", steps=50, guidance=4.0, width=size, height=size)

    @property
    def capabilities(self) -> Capabilities:
        d = self.defaults
        return Capabilities(options=OPTIONS, samplers=tuple(SAMPLERS), size_multiple=self.size_multiple,
                            native_size=(d.width, d.height), max_steps=self.schedule.num_train_timesteps)

    @property
    def size_multiple(self) -> int:
        return self.factor * self.unet.cfg.patch_size

    def class_id(self, prompt: str) -> int:
        """The class id a prompt names (`read_class`)."""
        return self.read_class(prompt)[0]

    def read_class(self, prompt: str) -> tuple[int, str | None]:
        """(class id, a warning or None) of a prompt: a class name, a class id where the model names none, or
        the one class all of whose words the prompt holds (warned); UnsupportedPrompt naming the classes otherwise."""
        name = prompt.strip()
        if name in self.labels:
            return self.labels[name], None
        if not self.labels and name.isdigit() and int(name) < self.unet.cfg.num_classes:
            return int(name), None
        words = set(_words(name))
        held = {cid for label, cid in self.labels.items() if set(_words(label)) <= words}
        if len(held) == 1:
            cid = held.pop()
            return cid, f"{prompt[:60]!r} is not a class name: read as the class {self.id2label[cid]!r}"
        known = ", ".join(repr(n) for n in sorted(self.labels)) or f"class ids 0..{self.unet.cfg.num_classes - 1}"
        if held:
            named = ", ".join(repr(self.id2label[c]) for c in sorted(held))
            raise UnsupportedPrompt(prompt, f"{self.name} is class-conditional: {prompt!r} names several classes "
                                            f"({named}); give one of them")
        raise UnsupportedPrompt(prompt, f"{self.name} is class-conditional: {prompt!r} is not one of its classes "
                                        f"({known})")

    def _resolve(self, r: GenerationRequest) -> GenerationRequest:
        r = r.with_defaults(self.defaults)
        check_sampling_request(r, SAMPLERS, multiple=self.size_multiple)
        return r

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt (a class name); image i of seed s starts from seed s + i."""
        with stop_polling(request.should_stop, self.unet):
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        r = self._resolve(request)
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        read = [self.read_class(p) for p in prompts]  # refused before any work
        labels = torch.tensor([cid for cid, _ in read])  # (N,)
        warnings = list(dict.fromkeys(w for _, w in read if w))
        guided = r.guidance > 1.0
        cond = {"class_labels": labels}
        uncond = {"class_labels": torch.full_like(labels, self.unet.null_class)} if guided else None
        plan = prepare_sampling(self.schedule, r.sampler, r.steps)
        generators = seed_generators(seeds)
        shape = (self.unet.cfg.in_channels, r.height // self.factor, r.width // self.factor)
        x = plan.start(seed_noise(generators, shape))  # (N, C, h, w)
        net = CastInputs.around(self.unet)  # bf16 weights on float32 samplers
        net = LearnedVariance(net) if self.unet.cfg.learn_sigma else net  # the eps half, as diffusers' split
        denoiser = plan.limit_x0(CFGDenoiser(plan.denoiser(net), r.guidance))
        with StepReport.of(r, plan.steps) as on_step:
            latents = plan.finish(plan.run(denoiser, x, {"cond": cond, "uncond": uncond}, on_step, generators))
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(self.vae.unscale(latents).to(vae_dtype)).float()
        pictures = to_pil(images)
        for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
            im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.unet))
        return GenerationResult(pictures, latents, seeds, warnings, time.perf_counter() - start)


def _words(text: str) -> list[str]:
    """The words that name a class: lower case, articles left out ("an orange cross" is in "a small orange
    cross")."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ("a", "an", "the")]


# ---------------------------------------------------------------------------------------
# t2i's own file: a DiT or PixArt network and its autoencoder, self-described
# ---------------------------------------------------------------------------------------

SYSTEM_NAME = "dit"


def latent_schedule() -> ScheduleConfig:
    """DDPM's linear betas (T = 1000) with eps prediction, as DiT and PixArt train, every sampler setting
    stated (no x0 clipping: latents are not images; trailing spacing, so a few-step run starts at T - 1)."""
    return ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon",
                          timestep_spacing="trailing", steps_offset=0, clip_sample=False, thresholding=False,
                          set_alpha_to_one=True, final_sigmas_type="zero")


@dataclass
class LatentTransformerConfig:
    """Everything needed to rebuild a t2i DiT / PixArt model from its weight file."""

    net: DiTConfig = field(default_factory=lambda: replace(DIT_PRESETS["shapes_s"]))
    vae: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    schedule: ScheduleConfig = field(default_factory=latent_schedule)
    labels: list[str] = field(default_factory=list)  # class names in id order (a class-conditional net)
    text_encoder: str | None = None  # "minilm": frozen all-MiniLM-L6-v2 token states (a text-conditional net)
    text_length: int = 32
    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance: float = 4.0
    image_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentTransformerConfig:
        d = dict(d)
        return cls(net=DiTConfig(**d.pop("net")), vae=AutoencoderKLConfig(**d.pop("vae")),
                   schedule=ScheduleConfig(**d.pop("schedule")), **d)

    def defaults(self) -> GenerationDefaults:
        return GenerationDefaults(sampler=self.sampler, steps=self.steps, guidance=self.guidance,
                                  width=self.image_size, height=self.image_size)


class LatentTransformer(nn.Module):
    """The weights of a t2i DiT or PixArt model: the frozen autoencoder `vae` and the network `net`."""

    def __init__(self, cfg: LatentTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.vae)
        self.net = DiT(cfg.net)

    def save(self, path: str | Path, system: str) -> None:
        """Write `vae.*` and `net.*` in float32 atomically, with the resolved config in the metadata under
        `system` ("dit" or "pixart": the family that loads it)."""
        state = {f"{part}.{k}": v.detach().float() for part in ("vae", "net")
                 for k, v in getattr(self, part).state_dict().items()}
        save_with_config(state, path, self.cfg.to_dict(), system)

    @classmethod
    def load(cls, path: str | Path, system: str) -> LatentTransformer:
        """Rebuild from a file written by `save` for `system`, config and tensors checked before anything
        is allocated; float32, frozen."""
        return load_system_file(path, system, f"a t2i {system} model file", LatentTransformerConfig.from_dict, cls,
                                lambda c: {"vae": c.vae, "net": c.net},
                                lambda c: check_schedule(c.schedule, f"{path}: schedule"))


# ---------------------------------------------------------------------------------------
# The diffusers folder: detect, load, write a tiny one
# ---------------------------------------------------------------------------------------


def load_transformer(folder: Path) -> DiT:
    """`transformer/` -> DiT, config and tensor names/shapes checked on the meta device first."""
    cfg = read_config_file(dit_config_from_diffusers, folder / "config.json")
    files = find_weights(folder, "diffusion_pytorch_model")
    tensors = dit_state_dict_from_diffusers(file_tensors(files), check_copies=False)
    net = build_checked(lambda: DiT(cfg), {"config": cfg}, tensors, str(folder))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict(f))
    return fill(net, dit_state_dict_from_diffusers(state), torch.float32)


def load(path: Path, dtype: torch.dtype = torch.float32) -> DiTPipeline:
    """A diffusers DiTPipeline folder or a t2i DiT file -> DiTPipeline (float32 weights unless dtype says
    otherwise)."""
    root = Path(path)
    if is_system_file(root, SYSTEM_NAME):
        file = system_file(root)
        model = LatentTransformer.load(file, SYSTEM_NAME)
        if not model.cfg.labels or model.cfg.text_encoder is not None:
            raise CheckpointError(f"{file}: a t2i DiT file names its classes and no text encoder")
        pipe = DiTPipeline(model.net, model.vae, model.cfg.schedule, dict(enumerate(model.cfg.labels)),
                           name=model_name(file), defaults=model.cfg.defaults())
    elif is_diffusers_dit(root):
        net = load_transformer(root / "transformer").eval()
        id2label = read_id2label(root)
        if any(not 0 <= k < net.cfg.num_classes for k in id2label):
            raise CheckpointError(f"{root}: id2label names classes outside 0..{net.cfg.num_classes - 1}")
        schedule, _ = read_schedule(root)
        pipe = DiTPipeline(net, load_vae(root / "vae").eval(), schedule, id2label, name=root.name)
    else:
        raise CheckpointError(f"{root}: neither a diffusers DiTPipeline folder nor a t2i DiT file")
    if dtype != torch.float32:
        pipe.unet.to(dtype)
    return pipe


@torch.no_grad()
def randomise_zeros(net: DiT) -> DiT:
    """The zero-initialised layers (adaLN-Zero, cross-attention outputs, the final layer) drawn from N(0, 0.02)
    in place, for a tiny random test model: as initialised, it would output 0."""
    for p in net.parameters():
        if not p.abs().sum():
            p.normal_(0, 0.02)
    return net


# The tiny model's classes: shapes-world captions, so the registry tests' prompts are classes.
TINY_LABELS = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a red square",
               "a blue circle", "a green square", "a yellow circle")


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random DiT of the tiny preset (8x8x4 latents, 32x32 images through the tiny f=4 VAE) as a
    diffusers DiTPipeline folder; adaLN-Zero weights randomised too, or the network would output 0."""
    torch.manual_seed(seed)
    cfg = replace(DIT_PRESETS["tiny"], num_classes=len(TINY_LABELS))
    net = randomise_zeros(DiT(cfg))
    vae_cfg = replace(AUTOENCODER_KL_CONFIGS["tiny"], sample_size=32)
    vae = AutoencoderKL(vae_cfg)
    root = folder / "dit-tiny"
    write_dit_transformer(root / "transformer", cfg, net.state_dict())
    (root / "vae").mkdir(parents=True, exist_ok=True)
    (root / "vae" / "config.json").write_text(json.dumps(vae_config_to_diffusers(vae_cfg), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    schedule = ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")
    write_scheduler_config(schedule, root / "scheduler")
    index = {"_class_name": PIPELINE, "transformer": ["diffusers", "DiTTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
             "id2label": {str(i): n for i, n in enumerate(TINY_LABELS)}}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


SYSTEM = System(
    name=SYSTEM_NAME,
    description="DiT: a class-conditional diffusion transformer (prompt = class name), a diffusers DiTPipeline "
                "folder or a t2i DiT .safetensors (`t2i train dit`)",
    detect=lambda path: is_diffusers_dit(Path(path)) or is_system_file(Path(path), SYSTEM_NAME),
    load=load,
    write_tiny=write_tiny,
)
