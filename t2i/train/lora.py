"""`t2i train lora`: a LoRA (Hu et al. 2021) trained on a frozen model, written in the kohya format.

The step function for `t2i.train.fit` (resume, NaN stop, progress, sample grids come from there).
Any model `t2i.load` reads that has a U-Net and a KL autoencoder (an SD 1.x/2.x/SDXL diffusers folder
or single file, the shapes LDM file) is loaded, every weight frozen; chosen Linear/Conv2d layers W0 get

    h = W0 x + s * B A x,   s = alpha / r    (LoRA eq. 3)

through forward hooks (the networks' modules and state dicts stay as they are), A (r, in) initialised as
PEFT and kohya do, B (out, r) zero so the run starts exactly at the base model. The loss is the model's
own denoising objective (its schedule and eps/v prediction, `DiffusionLoss`) on the frozen VAE's
posterior samples of the data (`--data folder/jsonl`: images with captions).

`--aspect-buckets` (SDXL, Podell et al. 2023, sec. 2.2-2.3, as kohya's `--enable_bucket`): the images are
read at their own sizes, grouped into aspect buckets of about the training size's pixel count, each batch
one bucket, encoded at that bucket's size; for SDXL the U-Net's time ids are each image's true original
size and crop top-left in the bucket (`BucketedData.time_ids`), not the uncropped square of a plain run.
The fixed-noise loss and the sample grids stay square.

The file written (`<out>/<name>.safetensors`) is in the kohya / A1111 layout (`lora_unet_...`,
`lora_te_...` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`; `t2i.adapters.lora.write_lora`),
which A1111, ComfyUI, diffusers' `load_lora_weights` and t2i's `--lora FILE` read.

DreamBooth (`--class-prompt`, `--class-images`, `--prior-weight`, `--instance-prompt`): the instance loss plus
lambda times the loss on class images the frozen model draws first (`t2i.train.dreambooth`, eq. 2).

`AdapterTrainConfig` and `FrozenModel` are shared with textual inversion (`t2i.train.textual_inversion`):
what a run that trains something small on a frozen model needs besides the small thing itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.adapters.lora import LoraLayer, NamedLayer, named_layers, write_lora
from t2i.diffusion.losses import DiffusionLoss
from t2i.text.encoders import CLIPTextEncoder, MiniLMTextEncoder, SDXLTextEncoder, TextEncoding
from t2i.train.config import LoopConfig
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.dreambooth import check_prior, with_prior, write_class_images
from t2i.train.fit import Grid, Run, Step, Task

EVAL_SEED = 1234  # the fixed timesteps and noise of the held-fixed loss (`FrozenModel.fixed_loss`)


@dataclass
class AdapterTrainConfig(LoopConfig):
    """A run that trains an adapter on a frozen model."""

    model: str = ""  # anything `t2i.load` reads with a U-Net and a KL autoencoder
    data: str = "folder"
    data_path: str | None = None
    image_size: int = 0  # training image side in pixels; 0: the model's native size
    # SDXL-style multi-aspect training (`t2i.train.buckets`; `t2i train lora --aspect-buckets`): each batch one
    # bucket of about image_size^2 pixels, the images at their own aspect ratios; a U-Net with SDXL's
    # micro-conditioning is given each image's original size and crop. crop_zoom: with it, (share, largest
    # factor) of the images enlarged, then cropped at a random offset.
    aspect_buckets: bool = False
    crop_zoom: tuple[float, float] | None = None
    min_snr_gamma: float = 0.0  # Min-SNR weighting; 0: plain MSE (kohya's default)
    caption_dropout: float = 0.0
    sample_prompts: list[str] | None = None  # sample grid prompts; None: the data's first 4 distinct captions
    sample_steps: int = 20
    eval_items: int = 4  # data items in the fixed-noise loss logged at eval_every (and at the end)
    steps: int = 500
    batch_size: int = 1
    warmup: int = 0
    image_every: int = 100
    ckpt_every: int = 100


@dataclass
class LoraTrainConfig(AdapterTrainConfig):
    """`t2i train lora`. Targets are module-name endings in diffusers' (U-Net) and transformers' (CLIP)
    names, comma-separated; the defaults are the attention projections, as in the LoRA paper."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    unet_targets: str = "to_q,to_k,to_v,to_out.0"
    text_encoder: bool = False  # also train LoRAs on the CLIP text encoder(s: SDXL's two)
    text_targets: str = "q_proj,k_proj,v_proj,out_proj"
    name: str = "lora"  # the file is <out>/<name>.safetensors; A1111's <lora:name:1>
    lr: float = 1e-4
    # DreamBooth (t2i.train.dreambooth): prior preservation is on when class_prompt is given
    instance_prompt: str = ""  # every data image's caption (e.g. 'a sks dog'); "": the data's own captions
    class_prompt: str = ""  # the subject's class ('a dog'): class images are drawn from it
    class_images: int = 0  # how many (in <out>/class_images, drawn by the frozen model where missing)
    prior_weight: float = 1.0  # lambda of DreamBooth's eq. 2 (and of the layout model's --replay scenes)
    # The layout model (t2i-shapes-layout; `t2i.train.new_word`): it trains on `--data shapes` scenes with
    # their truth layouts, as it draws; a new shape word (`new_word`) adds the planner's rows for it
    new_word: str = ""  # a shape the model never saw (t2i.data.shapes.world.NEW_SHAPES, e.g. 'ring')
    planner_steps: int = 150  # the first steps of the run also train the planner's new rows (0: none)
    planner_batch: int = 32
    planner_lr: float = 3e-2
    planner_share: float = 0.75  # share of the planner's captions that name the word (the rest: old words)
    replay: int = 0  # ordinary world scenes per step beside the batch, their loss weighted by prior_weight
    replay_target: str = "truth"  # "truth": their denoising loss; "base": the frozen model's own prediction
    pixel_weight: float = 0.0  # lambda of an L1 loss on the decoded x0 estimate (DecodedLoss; 0: off)
    pixel_batch: int = 8  # samples of each batch decoded for it (the least noisy)


# ============================================================================ the frozen model


def encode_trainable(pipe: Any, prompts: list[str]) -> TextEncoding:
    """The prompts' encoding with autograd on, for adapters trained through the text encoder.

    The CLIP encoders (SD 1.x/2.x's one, SDXL's pair) run under `torch.no_grad` everywhere else and
    have an `encode_trainable` form. The shapes models' MiniLM: its `encode` body run without the
    `torch.no_grad` it is decorated with."""
    enc = pipe.text_encoder
    if isinstance(enc, MiniLMTextEncoder):
        return MiniLMTextEncoder.encode.__wrapped__(enc, prompts)
    if not isinstance(enc, CLIPTextEncoder | SDXLTextEncoder):
        raise ValueError(f"{pipe.name}: training through the text encoder needs CLIP text encoders (SD 1.x/2.x/XL); "
                         f"this model has {type(enc).__name__}")
    return enc.encode_trainable(prompts)


class FrozenModel:
    """A model loaded by `t2i.load` with every weight frozen, its training data and its denoising loss."""

    def __init__(self, cfg: AdapterTrainConfig, run: Run) -> None:
        import t2i

        if not cfg.model:
            raise ValueError("--model is required: a model t2i loads (a diffusers folder, an SD single file, "
                             "a t2i model file such as t2i/assets/default/model.safetensors)")
        pipe = t2i.load(cfg.model)
        if not isinstance(getattr(pipe, "unet", None), nn.Module) or not hasattr(pipe, "vae"):
            raise ValueError(f"{cfg.model}: adapters train on latent diffusion models with a U-Net "
                             f"({pipe.name} is {pipe.family})")
        for net in (pipe.unet, pipe.vae, pipe.text_encoder):
            net.requires_grad_(False).eval()
        self.cfg, self.pipe, self.info = cfg, pipe, run.info
        self.size = cfg.image_size or pipe.defaults.width
        if self.size % pipe.vae_scale:
            raise ValueError(f"--image-size {self.size} must be a multiple of the autoencoder's {pipe.vae_scale}")
        if cfg.crop_zoom is not None and not cfg.aspect_buckets:
            raise ValueError("--crop-zoom enlarges and crops the images of --aspect-buckets: give that too")
        if cfg.aspect_buckets and is_layout_pipeline(pipe):
            raise ValueError(f"--aspect-buckets: {pipe.name} (the layout model) trains on square shapes scenes "
                             "with their layouts; bucket a caption-only model's --data folder/jsonl")
        zoom = None if cfg.crop_zoom is None else (float(cfg.crop_zoom[0]), float(cfg.crop_zoom[1]))
        self.data = open_data(cfg.data, cfg.data_path, self.size, cfg.seed, run.log.text,
                              workers=cfg.data_workers, size_multiple=self.size_multiple() if cfg.aspect_buckets
                              else None, crop_zoom=zoom)
        self._log = run.log.text
        self._fixed_data: Any = None
        s = pipe.schedule
        self.loss_fn = DiffusionLoss(s.alphas_cumprod(), s.prediction_type, cfg.min_snr_gamma or None)

    def size_multiple(self) -> int:
        """Pixel multiple every bucket side needs: the autoencoder's factor times the U-Net's downsamplings
        (as `t2i.train.ldm.size_multiple`), so that every level's skip connection meets its upsampling."""
        return self.pipe.vae_scale * 2 ** (len(self.pipe.unet.cfg.block_channels) - 1)

    def latents(self, position: int, gen: torch.Generator, batch_size: int | None = None,
                info: DistInfo | None = None, source: Any = None, caption: str = "") -> tuple[torch.Tensor, list[str]]:
        """The batch at data `position` (of `source`, default the training data): VAE posterior samples
        (B, C, h, w), scaled as the U-Net sees them, and the captions (`caption` in place of each when
        given; caption dropout drawn from `gen`)."""
        source = self.data if source is None else source
        x, captions, _ = source.batch(position, batch_size or self.cfg.batch_size, info or self.info)
        captions = [caption] * len(captions) if caption else captions
        drop = torch.rand(len(captions), generator=gen) < self.cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        vae = self.pipe.vae
        return vae.scale(vae.encode(x).sample(gen)).float(), captions

    def time_ids(self, position: int) -> torch.Tensor | None:
        """(B, 6) the micro-conditioning of the training batch at `position` (original h, w, crop top,
        left, bucket h, w) when the data is bucketed and the U-Net reads time ids (SDXL); None otherwise."""
        if not (self.cfg.aspect_buckets and self.pipe.micro_conditioning):
            return None
        return self.data.time_ids(position, self.cfg.batch_size, self.info)

    def loss(self, z: torch.Tensor, enc: TextEncoding, gen: torch.Generator,
             time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """() the denoising loss of latents z (B, C, h, w) under the encoded captions. time_ids: (B, 6) the
        batch's micro-conditioning (`time_ids`); None: each image whole and uncropped at z's size."""
        s = self.pipe.vae_scale
        # The pipeline's own network inputs: SDXL's size/crop time ids too (the full, uncropped image) ...
        cond = self.pipe.network_conditioning(enc, z.shape[-2] * s, z.shape[-1] * s, 6.0)
        if time_ids is not None and "time_ids" in cond:
            # ... or each image's original size and crop from the data, before the pipeline's tail: the
            # target size (the bucket's, as in the data) or a refiner's aesthetic score.
            cond["time_ids"] = torch.cat([time_ids[:, :4].to(cond["time_ids"]), cond["time_ids"][:, 4:]], dim=1)
        return self.loss_fn(self.pipe.unet, z, cond, gen)

    @property
    def fixed_data(self) -> Any:
        """A second source over the same data order, for the evaluations and grids: the training
        source may be read by the loop's prefetch thread at the same time (a stream, e.g. WebDataset
        shards, cannot serve two readers) and must see only the training positions, for an exact resume."""
        if self._fixed_data is None:
            c = self.cfg
            self._fixed_data = open_data(c.data, c.data_path, self.size, c.seed, self._log)
        return self._fixed_data

    @torch.no_grad()
    def fixed_loss(self, encode) -> float:
        """The loss of the first `eval_items` items of the data order at fixed timesteps and noise
        (EVAL_SEED), one item at a time, through `encode(captions) -> TextEncoding`: the number that must
        fall while training overfits, free of the step loss's draw of t."""
        gen = torch.Generator().manual_seed(EVAL_SEED)
        x, captions, _ = self.fixed_data.batch(0, self.cfg.eval_items, DistInfo())  # any source: folder, shards...
        vae, losses = self.pipe.vae, []
        for image, caption in zip(x, captions, strict=True):
            z = vae.scale(vae.encode(image[None]).sample(gen)).float()  # (1, C, h, w)
            losses.append(self.loss(z, encode([caption]), gen).item())
        return sum(losses) / len(losses)

    def sample_prompts(self, rewrite=lambda c: c) -> list[str]:
        """The grid's prompts: the config's, or the first 4 distinct captions of the data order (rewritten)."""
        if self.cfg.sample_prompts:
            return list(self.cfg.sample_prompts)
        _, captions, _ = self.fixed_data.batch(0, 16, DistInfo())
        return list(dict.fromkeys(rewrite(c) for c in captions))[:4]

    @torch.no_grad()
    def grid(self, prompts: list[str]) -> Grid:
        """`prompts` sampled (seed 0, the model's default sampler) with the adapter as it is now."""
        pipe = self.pipe
        latents = torch.cat([pipe.generate(p, seed=0, steps=self.cfg.sample_steps, width=self.size,
                                           height=self.size).latents for p in prompts])
        images = pipe.vae.decode(pipe.vae.unscale(latents)).float().clamp(-1, 1)
        return Grid(images, prompts, nrow=len(prompts))


# ============================================================================ LoRA layers


class LoraModule(nn.Module):
    """s * B A x for one Linear or Conv2d W0 (LoCon for a convolution: A has W0's kernel, B is 1x1)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)  # A: (r, in)
            self.up = nn.Linear(rank, base.out_features, bias=False)  # B: (out, r)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)  # A: (r, in, kh, kw)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)  # B: (out, r, 1, 1)
        else:
            raise ValueError(f"LoRA layers go on Linear and ungrouped Conv2d layers, not {base}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # A as PEFT and kohya initialise it
        nn.init.zeros_(self.up.weight)  # B = 0: the run starts exactly at the base model
        self.alpha, self.scale = float(alpha), float(alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class LoraNetwork(nn.Module):
    """LoRA modules on named layers of a pipeline, keyed (and checkpointed) by their kohya names.
    `attach()` adds each module's output to its layer's through a forward hook; `detach()` removes them."""

    def __init__(self, layers: list[NamedLayer], rank: int, alpha: float) -> None:
        super().__init__()
        self.lora = nn.ModuleDict({layer.kohya: LoraModule(layer.target.module, rank, alpha) for layer in layers})
        self._bases = {layer.kohya: layer.target.module for layer in layers}  # not submodules: not saved
        self._hooks: list[Any] = []

    def attach(self) -> LoraNetwork:
        for name, base in self._bases.items():
            self._hooks.append(base.register_forward_hook(_adder(self.lora[name])))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """The base model inside the block (the hooks off), the LoRA again after it."""
        self.detach()
        try:
            yield
        finally:
            self.attach()

    def layers(self) -> dict[str, LoraLayer]:
        """{kohya name: LoraLayer} as `write_lora` writes them."""
        return {name: LoraLayer(m.down.weight, m.up.weight, m.alpha) for name, m in self.lora.items()}


def _adder(lora: LoraModule):
    def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + lora(args[0].to(lora.down.weight.dtype)).to(out.dtype)

    return hook


def select_layers(pipe: Any, unet_targets: str, text_targets: str | None) -> list[NamedLayer]:
    """The layers whose diffusers/transformers name ends with one of the comma-separated targets
    (`to_q`, `to_out.0`, `q_proj`; the text encoders' only when text_targets is given). A target
    matching no layer is an error naming it: a typo would otherwise train fewer layers in silence."""
    wanted = {"unet": [t.strip() for t in unet_targets.split(",") if t.strip()],
              "text": [t.strip() for t in (text_targets or "").split(",") if t.strip()]}
    chosen, used = [], set()
    for layer in named_layers(pipe):
        part = "unet" if layer.diffusers.startswith("unet.") else "text"
        hit = next((t for t in wanted[part] if layer.diffusers.endswith("." + t)), None)
        if hit is not None:
            chosen.append(layer)
            used.add((part, hit))
    missing = [t for part, targets in wanted.items() for t in targets if (part, t) not in used]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no layer of {pipe.name} (targets end module names, e.g. "
                         "to_q, to_out.0, proj_in, ff.net.2 in the U-Net; q_proj, out_proj, fc1 in CLIP)")
    return chosen


def lora_alpha(rank: int, alpha: float | None) -> float:
    """kohya's alpha of a LoRA of `rank`: the given one, or the rank itself (scale alpha / rank = 1)."""
    return float(rank if alpha is None else alpha)


def attach_lora(pipe: Any, layers: list[NamedLayer], rank: int, alpha: float) -> LoraNetwork:
    """A fresh LoraNetwork on `layers`, attached (the pipeline computes with it from now on)."""
    for m in pipe.unet.modules():  # fused inference projections (t2i.nets.attention) would bypass the hooks
        if hasattr(m, "unfuse_projections"):
            m.unfuse_projections()
    return LoraNetwork(layers, rank, alpha).attach()


def export_lora(cfg: LoraTrainConfig, net: LoraNetwork, steps: int) -> Path:
    """`<out>/<name>.safetensors` in the kohya layout, with kohya's training metadata."""
    alpha = lora_alpha(cfg.rank, cfg.alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(alpha), "ss_output_name": cfg.name, "ss_steps": str(steps),
            "ss_training_comment": f"t2i train lora on {Path(cfg.model).name}",
            "t2i_config": json.dumps(cfg.to_dict())}
    return write_lora(Path(cfg.out) / f"{cfg.name}.safetensors", net.layers(), meta)


def is_layout_pipeline(pipe: Any) -> bool:
    """A pipeline whose U-Net draws from a layout (boxes with phrases) besides the caption."""
    from t2i.systems.shapes_layout import ShapesLayoutPipeline

    return isinstance(pipe, ShapesLayoutPipeline)


# ============================================================================ the run


def check_text_encoder(cfg: LoraTrainConfig, pipe: Any) -> None:
    """--text-encoder needs CLIP text encoders to put the LoRA on (SDXL: both, `lora_te1_`/`lora_te2_`)."""
    if cfg.text_encoder and not isinstance(pipe.text_encoder, CLIPTextEncoder | SDXLTextEncoder):
        raise ValueError(f"--text-encoder: {pipe.name}'s text encoder is {type(pipe.text_encoder).__name__}; "
                         "text-encoder LoRAs are trained on CLIP encoders (SD 1.x/2.x/XL)")


def build_plain_lora(cfg: LoraTrainConfig, run: Run, frozen: FrozenModel) -> Task:
    """The LoRA run on a caption-only model (SD, the plain shapes model); the layout model's is
    `t2i.train.new_word.build_layout_lora`, and `t2i.train.lora_run` picks between them."""
    pipe = frozen.pipe
    check_text_encoder(cfg, pipe)
    if cfg.new_word or cfg.replay or cfg.pixel_weight:
        raise ValueError(f"--new-word, --replay and --pixel-weight train the layout model (t2i-shapes-layout), "
                         f"not {pipe.name}")
    alpha = lora_alpha(cfg.rank, cfg.alpha)
    layers = select_layers(pipe, cfg.unet_targets, cfg.text_targets if cfg.text_encoder else None)
    prior_data = None
    if cfg.class_prompt or cfg.class_images:  # drawn before the LoRA is attached: the frozen model's prior
        check_prior(cfg.class_prompt, cfg.class_images, cfg.prior_weight)
        folder = write_class_images(pipe, cfg.class_prompt, cfg.class_images, Path(cfg.out) / "class_images",
                                    frozen.size, cfg.sample_steps, run.log.text)
        prior_data = open_data("folder", str(folder), frozen.size, cfg.seed + 1, run.log.text)
    net = attach_lora(pipe, layers, cfg.rank, alpha)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    done = {"steps": 0}

    def encode(captions: list[str]) -> TextEncoding:
        return encode_trainable(pipe, captions) if cfg.text_encoder else pipe.text_encoder.encode(captions)

    def latents(position: int, gen: torch.Generator, source: Any = None) -> tuple[torch.Tensor, Any]:
        """Latents and their conditioning: the captions' (frozen, unless the text encoder trains) encoding,
        and the training batch's time ids (None for the square class images, or without buckets)."""
        z, captions = frozen.latents(position, gen, source=source, caption="" if source else cfg.instance_prompt)
        text = captions if cfg.text_encoder else pipe.text_encoder.encode(captions)
        return z, (text, None if source is not None else frozen.time_ids(position))

    def prepare(position: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, Any], Any]:
        """The data's latents and text, and the class images' (DreamBooth) or None. The class images' draws
        come from their own generator (a function of the position, so resume stays exact): the instance
        batch and loss see the same numbers as without a prior, and lambda 0 is the plain run."""
        if prior_data is None:
            return latents(position, gen), None
        prior_gen = torch.Generator().manual_seed(cfg.seed * 2**32 + position)
        return latents(position, gen), latents(position, prior_gen, prior_data)

    def term(z: torch.Tensor, cond: Any, gen: torch.Generator) -> torch.Tensor:
        text, time_ids = cond
        return frozen.loss(z, encode(text) if cfg.text_encoder else text, gen, time_ids)

    def step(batch: tuple[tuple[torch.Tensor, Any], Any], s: Step) -> dict[str, float]:
        loss, parts = with_prior(term, cfg.prior_weight, *batch, s.generator)
        gnorm = s.update(loss, opt, params, average=params)  # LoRA weights sit outside any DDP module
        done["steps"] = s.index + 1
        return {"lora/loss": loss.item(), "lora/grad_norm": gnorm, **parts}

    def export() -> None:
        export_lora(cfg, net, done["steps"])

    def evaluate(step: int) -> None:
        run.log.scalars(step, {"lora/fixed_loss": frozen.fixed_loss(encode)})

    prompts = frozen.sample_prompts()
    about = (f", {len(layers)} layers of {pipe.name} (rank {cfg.rank}, alpha {alpha:g}, "
             f"{sum(p.numel() for p in params) / 1e6:.3f}M parameters)")
    return Task("lora", {"lora": net}, {"opt": opt}, prepare=prepare, step=step,
                grid=lambda: frozen.grid(prompts), grid_name="lora", export=export, evaluate=evaluate, about=about)
