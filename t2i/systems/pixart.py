"""PixArt-alpha (Chen et al. 2023): a text-conditional diffusion transformer on SD-VAE latents.

The network is t2i's DiT with PixArt's options (`t2i.nets.dit`: adaLN-single, cross-attention to the
projected T5 token states, micro-conditions at 1024 px). Generation is the shared latent pipeline
(`LatentDiffusionPipeline`) with PixArt's conditioning: prompts lower-cased and stripped as diffusers'
pipeline does without `clean_caption` (its HTML/URL scrubbing needs bs4 and ftfy and is not
implemented), T5 states of a 120-token window with the padding masked out of the cross-attention, the
empty negative prompt encoded (not zeroed), learned variance dropped at the edge, and with
micro-conditions the requested (height, width) and aspect ratio h / w. Generation runs at the
requested size (diffusers' aspect-ratio binning, which samples at the nearest trained size and
resizes, is not done).

Layouts: a diffusers PixArtAlphaPipeline folder (`t2i.checkpoints.diffusers_pixart`; T5 encoder and
tokenizer read locally) and t2i's own file (`t2i.systems.dit.LatentTransformer` with
`t2i_system` "pixart": what `t2i train pixart` exports, frozen MiniLM as the text encoder).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.diffusers_folder import file_tensors, load_vae, read_config_file, read_schedule
from t2i.checkpoints.diffusers_pixart import (
    TEXT_LENGTH,
    is_diffusers_pixart,
    pixart_config_from_diffusers,
    pixart_state_dict_from_diffusers,
)
from t2i.checkpoints.io import (
    CheckpointError,
    find_weights,
    is_system_file,
    load_state_dict,
    model_name,
    system_file,
)
from t2i.checkpoints.limits import build_checked, fill
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.diffusion.precond import LearnedVariance
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.dit import DIT_PRESETS, DiT
from t2i.nets.pixart_controlnet import PixArtControlNet
from t2i.nets.pixart_controlnet import check_fits as check_controlnet_fits
from t2i.samplers.sampling import SAMPLERS
from t2i.systems.base import Capabilities, GenerationDefaults, GenerationRequest, System
from t2i.systems.dit import LatentTransformer, LatentTransformerConfig, randomise_zeros
from t2i.systems.latent_diffusion import LatentDiffusionPipeline
from t2i.systems.shapes_ldm import VAE_PRESETS
from t2i.systems.stable_diffusion import SCHEDULER_SAMPLERS
from t2i.text.encoders import T5TextEncoder, TextEncoding

SYSTEM_NAME = "pixart"
# What run() honours: the shared pipeline's text-to-image, img2img and inpainting options, and a PixArt
# ControlNet (PixArt-delta); not the U-Net-only ones (DeepCache, refiner) nor the preview decoder.
OPTIONS = frozenset({"negative_prompt", "steps", "guidance", "guidance_rescale", "sampler", "schedule", "eta",
                     "width", "height", "init_image", "strength", "mask", "controlnet", "control_image",
                     "control_scale"})
STEPS, GUIDANCE = 20, 4.5  # PixArtAlphaPipeline's defaults


class PixArtPipeline(LatentDiffusionPipeline):
    """A PixArt network (`DiT` with caption_dim), its autoencoder, text encoder and schedule."""

    paints_words = False  # eDiff-I's regions act on U-Net cross-attention maps, not these projected captions

    def __init__(self, net: DiT, vae: AutoencoderKL, text_encoder: nn.Module, schedule: ScheduleConfig, *,
                 name: str = "pixart", defaults: GenerationDefaults | None = None) -> None:
        if not net.cfg.caption_dim:
            raise ValueError("a PixArt pipeline needs a network that cross-attends to text (caption_dim)")
        if text_encoder.context_dim != net.cfg.caption_dim:
            raise ValueError(f"the text encoder gives {text_encoder.context_dim}-wide states, the network reads "
                             f"{net.cfg.caption_dim}")
        super().__init__(net, vae, text_encoder, schedule, name=name, family=SYSTEM_NAME, defaults=defaults)

    @property
    def capabilities(self) -> Capabilities:
        d = self.defaults
        return Capabilities(options=OPTIONS, samplers=tuple(SAMPLERS), schedules=("default", "karras"),
                            size_multiple=self.size_multiple, native_size=(d.width, d.height),
                            max_steps=self.schedule.num_train_timesteps)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * self.unet.cfg.patch_size

    def network_conditioning(self, enc: TextEncoding, height: int, width: int,
                             aesthetic: float) -> dict[str, torch.Tensor]:
        """context (B, T, D) and its mask (B, T); with micro-conditions resolution (B, 2) = (height,
        width) in pixels and aspect_ratio (B, 1) = height / width, as PixArtAlphaPipeline passes them."""
        b = enc.context.shape[0]
        cond = {"context": enc.context}
        if enc.mask is not None:
            cond["mask"] = enc.mask.bool()
        if self.unet.cfg.micro_conditions:
            cond["resolution"] = torch.tensor([[float(height), float(width)]]).expand(b, 2)
            cond["aspect_ratio"] = torch.tensor([[height / width]]).expand(b, 1)
        return cond

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str], height: int, width: int,
                       guided: bool) -> tuple[dict, dict | None, list[str]]:
        """(cond, uncond or None, warnings): every distinct text encoded once, lower-cased and stripped
        (PixArt's `_text_preprocessing`); no A1111 prompt syntax, which T5 was not trained on."""
        texts = list(dict.fromkeys(prompts + (negative_prompts if guided else [])))
        enc = self.text_encoder.encode([t.lower().strip() for t in texts])
        warnings = [f"prompt {t[:40]!r} was cut to the text encoder's {self.text_encoder.max_length} tokens"
                    for t, cut in zip(texts, enc.truncated, strict=True) if cut]

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            idx = torch.tensor([texts.index(t) for t in batch])
            mask = None if enc.mask is None else enc.mask[idx]
            return self.network_conditioning(TextEncoding(enc.context[idx], None, mask, []), height, width, 0.0)

        return pick(prompts), pick(negative_prompts) if guided else None, warnings

    def _control(self, request: GenerationRequest, width: int, height: int
                 ) -> tuple[PixArtControlNet, torch.Tensor, float] | None:
        """The request's PixArt ControlNet (PixArt-delta), checked against this network, with its image
        VAE-encoded as an img2img input is (posterior mode, scaled): (ControlNet, (1, C, h, w), scale)."""
        controlnet = request.controlnet
        if controlnet is None and request.control_image is None:
            return None
        if not isinstance(controlnet, PixArtControlNet) or request.control_image is None:
            raise ValueError("a PixArt model takes a PixArt ControlNet (`t2i train controlnet --base` a PixArt "
                             f"model) with a control image, not {type(controlnet).__name__} "
                             f"{'with' if request.control_image is not None else 'without'} one")
        check_controlnet_fits(controlnet.cfg, self.unet.cfg)
        if request.mask is not None or not math.isfinite(request.control_scale):
            raise ValueError("a PixArt ControlNet takes a finite control_scale and no inpainting mask")
        return controlnet, self.encode_image(request.control_image, width, height), request.control_scale

    def _sampling_net(self, deepcache: int = 1, control: tuple[PixArtControlNet, torch.Tensor, float] | None = None,
                      eager: bool = False) -> nn.Module:
        """The shared pipeline's network, with a ControlNet's residuals added to the first blocks (through
        `PixArtControlNet.controlling`, not the U-Net's skips) and the eps half of a learned variance."""
        net = super()._sampling_net(deepcache, None, eager)
        if control is not None:
            controlnet, latents, scale = control
            net = controlnet.controlling(net, self.unet, latents, scale)
        return LearnedVariance(net) if self.unet.cfg.learn_sigma else net  # the eps half, as diffusers' split

    def _resolve(self, *args, **kwargs):
        resolved = super()._resolve(*args, **kwargs)  # (steps, guidance, sampler, schedule, width, height)
        for what, v in (("width", resolved[4]), ("height", resolved[5])):
            if v % self.size_multiple:
                raise ValueError(f"{what} must be a multiple of {self.size_multiple} (autoencoder factor x patch "
                                 f"size), got {v}")
        return resolved


# ---------------------------------------------------------------------------------------
# Loading: a diffusers folder or t2i's own file
# ---------------------------------------------------------------------------------------


def load_transformer(folder: Path) -> DiT:
    """`transformer/` -> DiT with PixArt's options, config and tensor names/shapes checked on the meta
    device first."""
    cfg = read_config_file(pixart_config_from_diffusers, folder / "config.json")
    files = find_weights(folder, "diffusion_pytorch_model")
    tensors = pixart_state_dict_from_diffusers(file_tensors(files))
    net = build_checked(lambda: DiT(cfg), {"config": cfg}, tensors, str(folder))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict(f))
    return fill(net, pixart_state_dict_from_diffusers(state), torch.float32)


def load_minilm(length: int) -> nn.Module:
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=length)


def load(path: Path, dtype: torch.dtype = torch.float32) -> PixArtPipeline:
    """A diffusers PixArtAlphaPipeline folder or a t2i PixArt file -> PixArtPipeline (float32 weights
    unless dtype says otherwise)."""
    root = Path(path)
    if is_system_file(root, SYSTEM_NAME):
        file = system_file(root)
        model = LatentTransformer.load(file, SYSTEM_NAME)
        if model.cfg.text_encoder != "minilm":
            raise CheckpointError(f"{file}: unknown text encoder {model.cfg.text_encoder!r} (expected 'minilm')")
        pipe = PixArtPipeline(model.net, model.vae, load_minilm(model.cfg.text_length), model.cfg.schedule,
                              name=model_name(file), defaults=model.cfg.defaults())
        pipe.prompt_check = out_of_world_warning  # a shapes model: words outside its world draw nothing
    elif is_diffusers_pixart(root):
        net = load_transformer(root / "transformer")
        text = T5TextEncoder.from_folders(root / "tokenizer", root / "text_encoder", max_length=TEXT_LENGTH)
        schedule, scheduler_class = read_schedule(root)
        vae = load_vae(root / "vae").eval()
        size = net.cfg.sample_size * vae.cfg.downsample_factor
        defaults = GenerationDefaults(sampler=SCHEDULER_SAMPLERS.get(scheduler_class or "", "dpmpp_2m"),
                                      steps=STEPS, guidance=GUIDANCE, width=size, height=size)
        pipe = PixArtPipeline(net, vae, text, schedule, name=root.name, defaults=defaults)
    else:
        raise CheckpointError(f"{root}: neither a diffusers PixArtAlphaPipeline folder nor a t2i PixArt file")
    if dtype != torch.float32:
        pipe.unet.to(dtype)
    return pipe


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random PixArt of the tiny preset on MiniLM states (8x8x4 latents, 32x32 images through the tiny
    f=4 autoencoder) as t2i's own file; the zero-initialised layers randomised too, or it would output 0."""
    torch.manual_seed(seed)
    vae = replace(VAE_PRESETS["tiny"], sample_size=32)
    cfg = LatentTransformerConfig(net=replace(DIT_PRESETS["pixart_tiny"], caption_dim=384), vae=vae,
                                  text_encoder="minilm", image_size=32, steps=STEPS, guidance=GUIDANCE)
    model = LatentTransformer(cfg)
    randomise_zeros(model.net)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.safetensors", SYSTEM_NAME)
    return folder / "model.safetensors"


SYSTEM = System(
    name=SYSTEM_NAME,
    description="PixArt-alpha: a text-conditional diffusion transformer, a diffusers PixArtAlphaPipeline folder "
                "(T5) or a t2i PixArt .safetensors (`t2i train pixart`, MiniLM)",
    detect=lambda path: is_diffusers_pixart(Path(path)) or is_system_file(Path(path), SYSTEM_NAME),
    load=load,
    write_tiny=write_tiny,
)
