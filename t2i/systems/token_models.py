"""What the token families (MaskGIT, DALL-E) share: their self-describing file and the part of
their pipeline around the token sampler.

A token model's file is one safetensors holding the transformer (`transformer.*`), the frozen
VQ tokenizer it writes codes for (`vq.*`, so the file needs no other path) and the family's
resolved config (with both network configs) as JSON in the metadata, its `t2i_system` naming the
family. A pipeline encodes the prompts, lets the family's sampler write a (B, N) token map,
decodes the codes with the tokenizer and returns PIL images with A1111 parameters; image i of a
prompt with seed s draws from ``torch.Generator("cpu").manual_seed(s + i)`` only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.autoencoders.tokenizers import (
    allowed_codes,
    build_tokenizer,
    decode_tokens,
    kind_of,
    tokenizer_config_from_dict,
)
from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.io import (
    CheckpointError,
    check_safetensors_header,
    header_tensors,
    is_system_file,
    load_state_dict,
    model_name,
    read_config,
    save_with_config,
    system_file,
)
from t2i.checkpoints.limits import build_checked, fill
from t2i.imageio import from_pil, request_parameters, to_pil
from t2i.nets.token_transformer import TokenTransformer, TokenTransformerConfig
from t2i.quantize import precision_of
from t2i.seeds import seed_generators
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    ShippedModel,
    StepReport,
    System,
    per_image,
    stop_polling,
)
from t2i.tokens.sampling import check_draws

PARTS = ("transformer", "vq")  # the file's key prefixes
# The request fields of the token draws (t2i.tokens.sampling) every token family honours.
DRAW_OPTIONS = frozenset({"temperature", "top_k", "top_p"})
# The request fields of Muse's zero-shot editing (`TokenPipeline.edit_settings`): aMUSEd, Muse.
EDIT_OPTIONS = frozenset({"init_image", "mask", "strength"})


def save_token_model(net: TokenTransformer, vq: VQAutoencoder, config: dict[str, Any], path: str | Path,
                     system: str) -> None:
    """Write the transformer and the tokenizer (float32) with `config` in the metadata, atomically."""
    state = {f"{name}.{k}": v.detach().float() for name, module in zip(PARTS, (net, vq), strict=True)
             for k, v in module.state_dict().items()}
    save_with_config(state, path, config, system)


def build_network(cfg: Any) -> TokenTransformer:
    """The transformer of a family's model config: `cfg.network()` where the config builds its own (a
    TokenTransformer subclass with more parts, as Parti's encoder-decoder), else TokenTransformer(cfg.net)."""
    make = getattr(cfg, "network", None)
    return make() if make is not None else TokenTransformer(cfg.net)


def load_token_model(path: Path, system: str, what: str, from_dict: Callable[[dict[str, Any]], Any]
                     ) -> tuple[TokenTransformer, VQAutoencoder, Any]:
    """(transformer, tokenizer, config) of a file written by `save_token_model`: the config parsed by
    `from_dict` (its `net` and `vq` the two network configs), both networks built on the meta
    device and checked against the file's tensors before any weight is read. Frozen, eval mode."""
    raw = read_config(path, what, system)
    try:
        cfg = from_dict(raw)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed config of {what} ({type(e).__name__}: {e})") from None
    if cfg.net.num_codes != cfg.vq.num_codes:
        raise CheckpointError(f"{path}: the transformer writes {cfg.net.num_codes} codes, the tokenizer has "
                              f"{cfg.vq.num_codes}")
    tensors = header_tensors(check_safetensors_header(path))

    def part(name: str, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(f"{name}."): v for k, v in source.items() if k.startswith(f"{name}.")}

    net = build_checked(lambda: build_network(cfg), {"net": cfg.net}, part("transformer", tensors), str(path))
    vq = build_checked(lambda: build_tokenizer(cfg.vq), {"vq": cfg.vq}, part("vq", tensors), str(path))
    if set(tensors) != {f"{p}.{k}" for p, m in zip(PARTS, (net, vq), strict=True) for k in m.state_dict()}:
        raise CheckpointError(f"{path}: tensors outside {' and '.join(PARTS)}")
    state = load_state_dict(path)
    return fill(net, part("transformer", state), torch.float32), fill(vq, part("vq", state), torch.float32), cfg


def prefix_reporter(report: StepReport, num_tokens: int) -> Callable[[dict[str, Any]], None]:
    """`sample_autoregressive`'s callback as a StepReport: after each token, the (B, N) map so far with
    the positions not yet drawn shown as code 0 (the live preview of a token-by-token run)."""

    def on_token(info: dict[str, Any]) -> None:
        so_far = info["tokens"]  # (B, i + 1)
        report({"i": info["i"], "denoised": torch.nn.functional.pad(so_far, (0, num_tokens - so_far.shape[1]))})

    return on_token


def network_configs(d: dict[str, Any], two_grids: bool = False) -> dict[str, Any]:
    """The `net` and `vq` entries of a saved config dict as their dataclasses (the rest as given).
    two_grids: the family reads a VQ-VAE-2's token sequence (the transformer's top_grid then grid
    match the tokenizer's two grids); the others refuse one by name."""
    d = dict(d)
    d["net"] = TokenTransformerConfig(**d.pop("net"))
    d["vq"] = tokenizer_config_from_dict(d.pop("vq"))  # any tokenizer kind (VQ-VAE, VQGAN, ViT-VQGAN, dVAE)
    two = kind_of(d["vq"]) == "vqvae2"
    if two and not two_grids:
        raise ValueError("a VQ-VAE-2 tokenizer writes two token grids; this token family reads one (only "
                         "maskgit reads both)")
    if two != bool(d["net"].top_grid) or (two and d["net"].top_grid * 2 != d["net"].grid):
        raise ValueError(f"the transformer's maps (top_grid {d['net'].top_grid}, grid {d['net'].grid}) are not "
                         f"the tokenizer's ({'a top grid half the bottom' if two else 'one grid'})")
    return d


def check_token_request(r: GenerationRequest, samplers: tuple[str, ...]) -> None:
    """The checks every token family makes of a resolved request: a known sampler, a finite
    guidance, valid draw settings (ValueError naming the setting)."""
    if r.sampler not in samplers:
        raise ValueError(f"unknown sampler {r.sampler!r}; choose one of {', '.join(samplers)}")
    if not math.isfinite(r.guidance):
        raise ValueError(f"guidance must be a finite number, got {r.guidance}")
    check_draws(r.temperature, r.top_k, r.top_p)


def check_edit_request(r: GenerationRequest) -> GenerationRequest:
    """The request with its editing fields checked (ValueError naming them): init_image and mask together,
    strength only with them, in (0, 1] and leaving at least one step; unset strength is 1 when editing."""
    if (r.init_image is None) != (r.mask is None):
        raise ValueError("editing an image by masking its tokens takes init_image and mask (white = repaint) "
                         "together")
    if r.strength is not None and r.init_image is None:
        raise ValueError("strength applies to an init image and a mask")
    if r.init_image is None:
        return r
    r = replace(r, strength=1.0 if r.strength is None else r.strength)
    if not 0 < r.strength <= 1 or int(r.steps * r.strength) < 1:
        raise ValueError(f"strength must be in (0, 1] and leave at least one of the {r.steps} steps, got {r.strength}")
    return r


def edit_steps(r: GenerationRequest) -> int:
    """Model calls of one masked decoding: the last int(steps * strength) of the steps when editing (as
    diffusers' AmusedInpaintPipeline), else all."""
    return r.steps if r.init_image is None else int(r.steps * r.strength)


class TokenPipeline(RequestMethods):
    """A token transformer (`unet`, as every family names its main network, so that int8 precision
    quantizes it) and its tokenizer; a family supplies `options`, `samplers`, `_sample` and `_check`.

    Args:
        net: the transformer.
        vq: the frozen tokenizer whose codes it writes.
        name: shown in the PNG parameters; defaults: settings a request does not give.
    """

    family = "tokens"
    options: frozenset[str] = frozenset()  # the request fields run() honours (Capabilities.options)
    samplers: tuple[str, ...] = ()  # the sampler names it takes
    # The token draws a request leaves unset take these (a family sets them from its config;
    # `pipe.temperature = 0.8` changes them for every later request).
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(options=self.options, samplers=self.samplers, size_multiple=self.image_size,
                            native_size=(self.image_size,) * 2)

    def __init__(self, net: TokenTransformer, vq: VQAutoencoder, name: str, defaults: GenerationDefaults) -> None:
        if net.cfg.num_codes != vq.cfg.num_codes:
            raise ValueError(f"the transformer writes {net.cfg.num_codes} codes, the tokenizer has {vq.cfg.num_codes}")
        self.unet, self.vq, self.name, self.defaults = net, vq, name, defaults

    @property
    def image_size(self) -> int:
        """Pixels per side: the learned positions fix the token map, the tokenizer its scale."""
        return self.unet.cfg.grid * self.vq.cfg.downsample_factor

    def _resolve(self, r: GenerationRequest) -> GenerationRequest:
        r = r.with_defaults(self.defaults)
        for what, v in (("width", r.width), ("height", r.height)):
            if v != self.image_size:
                raise ValueError(f"{what} must be {self.image_size}: {self.name} writes a {self.unet.cfg.grid}x"
                                 f"{self.unet.cfg.grid} token map with learned positions, got {v}")
        check_token_request(r, self.samplers)
        self._check(r)
        return r

    def draws(self, r: GenerationRequest) -> dict[str, Any]:
        """temperature, top_k and top_p of the token draws: the request's, else the pipeline's."""
        return {"temperature": self.temperature if r.temperature is None else r.temperature,
                "top_k": self.top_k if r.top_k is None else r.top_k,
                "top_p": self.top_p if r.top_p is None else r.top_p}

    def _check(self, r: GenerationRequest) -> None:
        """The family's own checks of a resolved request (ValueError naming the setting)."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """An image (1, 3, H, W) in [-1, 1] -> its codes (1, N) in the transformer's order (an edit's init image)."""
        return self.vq.encode(image.to(next(self.vq.parameters()).dtype))[0].flatten(1)

    def edit_tokens(self, r: GenerationRequest, grid: tuple[int, int],
                    downscale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Muse's zero-shot inpainting / outpainting (Chang et al. 2023), as diffusers' AmusedInpaintPipeline:
        the init image's codes (h w,) and the positions to keep (h w,) bool: the mask resized to the
        (h, w) token grid (Lanczos, grey, >= 0.5 repaints), where it is black. downscale: the image is
        encoded at 1 / downscale of the request's size, averaged by area (a low-res stage's tokens)."""
        image = from_pil(r.init_image, (r.width, r.height))  # (1, 3, H, W) in [-1, 1]
        if downscale > 1:
            image = F.interpolate(image, scale_factor=1 / downscale, mode="area")
        codes = self.encode_image(image)[0]  # (h w,)
        small = r.mask.resize((grid[1], grid[0]), Image.LANCZOS).convert("L")
        repaint = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0) >= 0.5  # (h, w)
        return codes, ~repaint.flatten()

    def edit_settings(self, r: GenerationRequest, grid: tuple[int, int], batch: int, schedule: str,
                      downscale: int = 1) -> dict[str, Any]:
        """`t2i.tokens.sample_masked`'s arguments of an edit (empty without an init image): the image's
        tokens with the masked region redrawn (`edit_tokens`), over the last `edit_steps` of the steps on
        `schedule`, counting re-masked tokens over the whole map (diffusers' rule for a partial start)."""
        if r.init_image is None:
            return {}
        codes, keep = self.edit_tokens(r, grid, downscale)
        return dict(tokens=codes.expand(batch, -1), fixed=keep.expand(batch, -1),
                    start_step=r.steps - edit_steps(r), schedule=schedule, count_rule="total")

    def _sample(self, r: GenerationRequest, prompts: list[str], negatives: list[str],
                generators: list[torch.Generator], report: StepReport) -> torch.Tensor:
        """(B, N) int64 codes of the images, drawn from `generators` (one per image)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        """(B, N) codes -> images through the tokenizer (also the server's image of an interrupted run)."""
        return to_pil(self.decode_pixels(codes))

    @torch.no_grad()
    def decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes -> (B, 3, H, W) images in [-1, 1]."""
        return decode_tokens(self.vq, codes, self.image_size, self.image_size).float().clamp(-1, 1)

    def allowed_codes(self, net: TokenTransformer) -> torch.Tensor | None:
        """(N, V) bool: the codes each position of `net`'s token sequence can hold (None: all; a VQ-VAE-2's
        grids each their own codebook, `t2i.autoencoders.tokenizers.allowed_codes`)."""
        size = net.cfg.grid * self.vq.cfg.downsample_factor
        return allowed_codes(self.vq.cfg, size, size)

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt; image i of seed s draws from seed s + i."""
        with stop_polling(request.should_stop, self.unet, self.vq):
            start = time.perf_counter()
            r = self._resolve(request)
            prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
            with StepReport.of(r, self.total_steps(r)) as report:
                codes = self._sample(r, prompts, negatives, seed_generators(seeds), report)  # (B, N)
            pictures = self.decode(codes)
            extra = "".join(f", {k.replace('_', ' ').capitalize()}: {v}"
                            for k, v in self.extra_parameters(r).items() if v is not None)
            for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
                im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.unet)) + extra
            warnings = [m for m in map(self.prompt_warning, dict.fromkeys(prompts)) if m]
            return GenerationResult(pictures, codes, seeds, warnings, time.perf_counter() - start)

    def total_steps(self, r: GenerationRequest) -> int:
        """Model calls of one run (the progress bar's length)."""
        return r.steps

    def extra_parameters(self, r: GenerationRequest) -> dict[str, Any]:
        """Settings beyond the request's that change the pixels, for the PNG parameters (None: left out):
        the token draws where they are not plain sampling at temperature 1."""
        d = self.draws(r)
        plain = d["temperature"] == 1.0 and self.temperature == 1.0  # what a PNG without it reads back as
        return {**d, "temperature": None if plain else d["temperature"]}

    def prompt_warning(self, prompt: str) -> str | None:
        """A warning for a prompt the model cannot draw (e.g. words it never saw), or None."""
        return None


# ---------------------------------------------------------------------------------------
# A token family's file: load, a tiny random one, the System
# ---------------------------------------------------------------------------------------


def load_pipeline(path: Path, dtype: torch.dtype, system: str, what: str, from_dict: Callable[[dict[str, Any]], Any],
                  make: Callable[[TokenTransformer, VQAutoencoder, Any, str], TokenPipeline]) -> TokenPipeline:
    """A family's file (or a folder holding it as model.safetensors) -> `make(net, vq, cfg, name)`, the
    transformer then cast to `dtype` (the tokenizer stays float32)."""
    file = system_file(path)
    net, vq, cfg = load_token_model(file, system, what, from_dict)
    pipe = make(net, vq, cfg, model_name(file))
    if dtype != torch.float32:
        pipe.unet.to(dtype)
    return pipe


def tiny_tokenizer(seed: int = 0) -> VQAutoencoder:
    """A random tokenizer of the tiny preset (16x16 images, 4x4 codes of 32), codebook spread out so
    that different codes decode to different pixels."""
    torch.manual_seed(seed)
    vq = VQAutoencoder(replace(VQ_CONFIGS["tiny"]))
    with torch.no_grad():
        vq.quantize.codebook.normal_()
    return vq.eval()


def write_tiny_model(folder: Path, seed: int, system: str, config: Callable[[VQAutoencoderConfig], Any]) -> Path:
    """A random model (the tiny tokenizer, the transformer of `config(tokenizer config).net`) as
    folder/model.safetensors. Its image head gets random weights, as a trained one has: a new
    network's zero head gives equal logits, which would ignore the prompt and the guidance."""
    vq = tiny_tokenizer(seed)
    cfg = config(vq.cfg)
    net = build_network(cfg)
    with torch.no_grad():
        net.to_logits.weight.normal_(0, net.cfg.width ** -0.5)  # logits of about unit spread
    folder.mkdir(parents=True, exist_ok=True)
    save_token_model(net, vq, dataclasses.asdict(cfg), folder / "model.safetensors", system)
    return folder / "model.safetensors"


def token_system(name: str, description: str, load: Callable[[Path, torch.dtype], TokenPipeline],
                 config: Callable[[VQAutoencoderConfig], Any], shipped: tuple[ShippedModel, ...] = ()) -> System:
    """The System of a token family whose files `save_token_model` writes: detected by their metadata
    only; its tiny model built from `config` (see `write_tiny_model`); `shipped`: its models installed
    with t2i (t2i/assets)."""
    return System(name=name, description=f"{description}, a t2i .safetensors with its VQ tokenizer and a "
                  "t2i_config (or a folder holding it as model.safetensors)",
                  detect=lambda path: is_system_file(Path(path), name), load=load,
                  write_tiny=lambda folder, seed=0: write_tiny_model(Path(folder), seed, name, config),
                  shipped=shipped)
