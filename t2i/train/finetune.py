"""`t2i train finetune`: full fine-tuning of a model's U-Net on a CPU (issue 21).

Every weight of the U-Net trains on the model's own denoising loss; the VAE and the text encoder stay
frozen. What a run needs besides the U-Net (loading any model `t2i.load` reads with a U-Net and a KL
autoencoder, the data served as VAE latents with their captions' encodings, the loss, the fixed-noise
evaluation, the sample grids, `--aspect-buckets`) is LoRA's `FrozenModel` (`t2i.train.lora`), whose
U-Net is then made trainable; `t2i.train.fit` gives resume, the NaN stop, progress and checkpoints.

Memory, per the SD 1.5 U-Net measurements in `benchmarks/sd_finetune_memory.py` (860M parameters, batch
1): float32 weights 3.4 GB, gradients 3.4 GB, AdamW's two moments 6.9 GB (8 bytes a parameter),
activations ~1.4 GB at 512x512; a run holds the frozen VAE and CLIP text encoder besides (~0.8 GB in
float32). Hence the options:
- `--gradient-checkpointing` (`t2i.nets.grad_checkpoint`): the activations of every ResBlock and spatial
  transformer recomputed in the backward pass, about half of them saved (peak 8.59 -> 7.88 GB with SGD);
- `--bf16`: the forward under `torch.autocast("cpu", torch.bfloat16)`, float32 master weights, gradients
  and optimizer state; only where the CPU computes bf16 natively (AVX512-BF16 / AMX-BF16, `t2i.native_bf16`),
  refused elsewhere: emulated bf16 is far slower than float32. It saves little memory, since autocast
  keeps bf16 copies of the weights beside the smaller activations (512 px with checkpointing: 7.78 GB
  against 7.88; 256 px without: 7.92 GB against fp32's 7.55);
- `--optimizer sgd`: no optimizer state at all (the memory floor: ~7.8 GB at 512 px with checkpointing,
  against ~15.5 GB with AdamW), at the price of a far larger learning rate and slower progress;
- `--ema-decay D`: an exponential moving average of the weights is what the run exports (and evaluates,
  and samples); it costs one more copy of the U-Net (3.4 GB). 0 (the default): the trained weights.

The model is written where the run ends or is stopped (and every `--export-every N` steps if asked: a
whole U-Net each time, 3.4 GB for SD 1.5, while the checkpoints hold the weights anyway), replaced in
place, never half-written, in the layout it was read from, float32: a diffusers folder -> `OUT/model/` (a
diffusers folder `DiffusionPipeline.from_pretrained` and t2i read), an SD single file (.safetensors or
.ckpt) -> `OUT/model.safetensors` in the original SD layout, t2i's shapes model -> `OUT/model.safetensors`
in its own format.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.nets.grad_checkpoint import enable_gradient_checkpointing
from t2i.text.encoders import TextEncoding
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.lora import AdapterTrainConfig, FrozenModel

# AdamW (diffusers' train_text_to_image default) keeps two float32 moments per parameter, 8 bytes a parameter
# (6.9 GB for SD 1.5's U-Net, more than its weights); plain SGD (no momentum) keeps nothing.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # what `t2i.native_bf16` looks for in /proc/cpuinfo


@dataclass
class FinetuneConfig(AdapterTrainConfig):
    """`t2i train finetune`: the U-Net of `model` trained whole."""

    lr: float = 1e-5  # diffusers' train_text_to_image README recipe (AdamW, grad norm 1; the script's default: 1e-4)
    optimizer: str = "adamw"  # "adamw" (2 float32 moments a parameter) or "sgd" (no state)
    weight_decay: float = 1e-2  # diffusers' train_text_to_image default (adam_weight_decay)
    gradient_checkpointing: bool = False
    bf16: bool = False  # forward under bf16 autocast; only on CPUs with native bf16
    ema_decay: float = 0.0  # 0: no EMA, the trained weights are exported
    export_every: int = -1  # only where the run ends (or is stopped): the model is the whole U-Net


def check_bf16() -> None:
    """Refuse `--bf16` on a CPU without native bf16 (ValueError naming the missing flags)."""
    import t2i

    if not t2i.native_bf16():
        raise ValueError(f"--bf16: this CPU does not compute bf16 natively (neither {' nor '.join(BF16_FLAGS)} among "
                         "the flags of /proc/cpuinfo), and PyTorch's emulated bf16 is far slower than float32; train "
                         "in float32 (leave --bf16 out; --gradient-checkpointing saves activation memory)")


# ============================================================================ the exported model


Writer = Callable[[nn.Module, Path], Path]  # (U-Net to ship, destination) -> the path written


def model_writer(model: str, pipe: Any) -> tuple[str, Writer]:
    """The exported model's name in the run directory and how it is written (with a given U-Net, the
    rest of `pipe` as loaded), in the layout `model` was read from. ValueError for a family t2i cannot
    write back (checked before training, not at its end)."""
    from t2i.checkpoints.diffusers_folder import is_diffusers_folder
    from t2i.systems.registry import resolve

    system, path = resolve(model)
    if system.name == "stable_diffusion":
        from t2i.checkpoints.export import save_diffusers_folder, save_single_file
        from t2i.systems.stable_diffusion import parts_of

        folder = is_diffusers_folder(path)

        def write_sd(unet: nn.Module, dst: Path) -> Path:
            parts = dataclasses.replace(parts_of(pipe), unet=unet)
            return save_diffusers_folder(parts, dst) if folder else save_single_file(parts, dst)

        return ("model" if folder else "model.safetensors"), write_sd
    if system.name == "shapes_ldm":
        from t2i.checkpoints.io import read_config, system_file
        from t2i.systems.shapes_ldm import ShapesLDM, ShapesLDMConfig

        shapes_cfg = ShapesLDMConfig.from_dict(read_config(system_file(path), "a shapes LDM model file", "shapes_ldm"))

        def write_shapes(unet: nn.Module, dst: Path) -> Path:
            shipped = ShapesLDM(shapes_cfg)
            shipped.vae.load_state_dict(pipe.vae.state_dict())
            shipped.unet.load_state_dict(unet.state_dict())
            shipped.save(dst)
            return dst

        return "model.safetensors", write_shapes
    raise ValueError(f"{model}: t2i train finetune writes Stable Diffusion models (diffusers folders, single files) "
                     f"and t2i's shapes model back out; {path} is {system.name}")


def write_in_place(write: Writer, unet: nn.Module, dst: Path) -> Path:
    """`write(unet, dst)` replacing what is at dst without ever leaving a half-written model there: a
    file is written under a temporary name and renamed over it (`save_state_dict`), a folder is built
    next to it and swapped in."""
    if dst.suffix == ".safetensors":
        return write(unet, dst)
    new, old = dst.with_name(f".{dst.name}.new"), dst.with_name(f".{dst.name}.old")
    for stale in (new, old):
        shutil.rmtree(stale, ignore_errors=True)
    write(unet, new)
    if dst.exists():
        dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


# ============================================================================ the run


def build_finetune(cfg: FinetuneConfig, run: Run) -> Task:
    if cfg.optimizer not in OPTIMIZERS:  # before the model is loaded
        raise ValueError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1) (0: no EMA), got {cfg.ema_decay}")
    if cfg.bf16:
        check_bf16()
    frozen = FrozenModel(cfg, run)  # every weight frozen, the U-Net's unfrozen below
    pipe = frozen.pipe
    name, write = model_writer(cfg.model, pipe)
    target = Path(cfg.out) / name
    unet = pipe.unet
    unet.requires_grad_(True).train()
    wrapped = enable_gradient_checkpointing(unet) if cfg.gradient_checkpointing else 0
    params = list(unet.parameters())
    opt = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(unet, cfg.ema_decay) if cfg.ema_decay else None
    shipped = unet if ema is None else ema.averaged  # what is exported, evaluated and sampled
    # float32 master weights, gradients and optimizer state; only the forward's matmuls and convolutions in bf16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, TextEncoding, torch.Tensor | None]:
        """The batch's latents (B, C, h, w), its captions' (frozen) encoding and, bucketed, its time ids."""
        z, captions = frozen.latents(position, gen)
        return z, pipe.text_encoder.encode(captions), frozen.time_ids(position)

    def step(batch: tuple[torch.Tensor, TextEncoding, torch.Tensor | None], s: Step) -> dict[str, float]:
        z, enc, time_ids = batch
        with autocast:
            loss = frozen.loss(z, enc, s.generator, time_ids)
        gnorm = s.update(loss, opt, params, average=params)  # the U-Net is called bare, outside DDP
        return {"finetune/loss": loss.item(), "finetune/grad_norm": gnorm}

    @contextmanager
    def shipping() -> Iterator[None]:
        """The pipeline computes with the weights the export writes (the EMA's, when there is one), in
        eval mode; the trained U-Net in train mode again after it."""
        pipe.unet = shipped.eval()
        try:
            yield
        finally:
            pipe.unet = unet.train()

    def evaluate(step: int) -> None:
        with shipping():
            run.log.scalars(step, {"finetune/fixed_loss": frozen.fixed_loss(pipe.text_encoder.encode)})

    prompts = frozen.sample_prompts()

    def grid() -> Grid:
        with shipping():
            return frozen.grid(prompts)

    def export() -> None:
        write_in_place(write, shipped, target)

    modules: dict[str, nn.Module] = {"unet": unet} if ema is None else {"unet": unet, "ema": ema.averaged}
    about = (f", the U-Net of {pipe.name} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters, "
             f"{cfg.optimizer}, {'bf16 autocast' if cfg.bf16 else 'float32'}"
             + (f", {wrapped} blocks checkpointed" if cfg.gradient_checkpointing else "")
             + (f", EMA {cfg.ema_decay:g}" if ema is not None else "") + f") -> {target}")
    return Task("finetune", modules, {"opt": opt}, prepare=prepare, step=step, ema=ema, grid=grid,
                grid_name="finetune", export=export, evaluate=evaluate, about=about)


def train_finetune(cfg: FinetuneConfig, resume: bool = False, resume_lr: float | None = None,
                   given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a full fine-tuning of a model's U-Net. Returns the exit code."""
    return fit(cfg, build_finetune, resume=resume, resume_lr=resume_lr, given=given)
