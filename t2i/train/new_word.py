"""Teaching the layout model (`t2i-shapes-layout`) a shape word it never saw (issue 21), e.g. 'ring'.

The layout model has two learned stages, and a new word must pass both:
- the planner writes each object's shape as a token of a closed set (`t2i.layout.planner.VALUES`),
  so it gets a new token: one input-embedding row and one output-head row (`LayoutPlanner.add_shapes`,
  textual inversion's new embedding row, Gal et al. 2022), trained alone on the planner's own
  teacher-forced loss over captions that name the word (their truth layouts) and ordinary ones
  (so the new row learns not to fire on the old words); the rest of the planner stays frozen;
- the renderer reads the phrase ('a red ring') and the recaptioned prompt, but never drew a ring:
  it gets a LoRA (Hu et al. 2021; `t2i.train.lora.LoraNetwork`) on its attention, MLP and layout-input
  layers, trained on the model's own denoising loss over scenes with the new shape drawn from their
  truth layouts (recaptioned as the pipeline recaptions), plus a share of ordinary scenes.

Files (`save_new_word`, read back by `apply_new_word`): `<name>.safetensors`, the renderer LoRA in the
kohya layout (what `--lora` reads), and `<name>.planner.safetensors`, the planner's new rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i.adapters.lora import write_lora
from t2i.data.shapes.datasets import shapes_example, to_tensor
from t2i.data.shapes.layouts import scene_layout
from t2i.data.shapes.new_words import NEW_WORD_SEED, new_word_example, with_new_shape
from t2i.data.shapes.rendering import render_array
from t2i.data.shapes.world import Scene
from t2i.diffusion.losses import DecodedLoss, DiffusionLoss
from t2i.layout.captions import layout_caption
from t2i.layout.planner import END, LayoutPlanner, encode_layout, planner_loss, text_states
from t2i.layout.planner_data import planner_pair
from t2i.layout.spec import Layout
from t2i.train.lora import LoraNetwork, select_layers

RENDERER_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,phrase_proj,layout_in"
PLANNER_SUFFIX = ".planner.safetensors"


@dataclass
class NewWordConfig:
    """One adaptation run; steps are optimiser steps of each stage (planner rows, renderer LoRA)."""

    shape: str = "ring"
    seed: int = NEW_WORD_SEED
    share: float = 0.75  # share of training examples that use the new word (the rest: ordinary scenes)
    planner_steps: int = 300
    planner_batch: int = 32
    planner_lr: float = 3e-2
    renderer_steps: int = 400
    renderer_batch: int = 16
    renderer_lr: float = 1e-3
    rank: int = 8
    targets: str = RENDERER_TARGETS
    min_snr_gamma: float = 5.0
    # The renderer's own recipe (session 10): its x0 estimate also judged in pixels through the frozen decoder
    # (`DecodedLoss`); the default `lcm` sampler jumps to that estimate, so a latent loss alone blurs what it draws.
    pixel_weight: float = 0.3
    pixel_batch: int = 8


def uses_word(seed: int, index: int, share: float) -> bool:
    """Whether example `index` of `seed` is a new-word one (a pure function of the two)."""
    return bool(np.random.default_rng([seed, index, 21]).random() < share)


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor, what: str, show: bool, log: Callable[[str], None]) -> float:
    """One optimiser step on `loss`; returns it as a float (logged when `show`)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    if show:
        log(f"{what}: loss {loss.item():.4f}")
    return loss.item()


# ============================================================================ planner rows


def planner_example(seed: int, index: int, shape: str, share: float) -> tuple[str, list[int]]:
    """(caption, layout tokens) of planner pair `index` of `seed`, with the new shape for a `share` of them."""
    pair = planner_pair(seed, index)
    scene, caption = Scene(pair.objects, pair.background), pair.caption
    if uses_word(seed, index, share):
        scene, caption = with_new_shape(scene, caption, shape)
    return caption, encode_layout(scene.background, scene.objects, (shape,))


def train_planner_word(planner: LayoutPlanner, text_encoder: Any, cfg: NewWordConfig,
                       log: Callable[[str], None] = print) -> list[float]:
    """Adds `cfg.shape` to the planner and trains its two rows (every other weight frozen). Returns the
    step losses (nats per layout token)."""
    planner.requires_grad_(False)
    planner.add_shapes((cfg.shape,))
    params = [planner.new_token, *planner.new_head.parameters()]  # type: ignore[union-attr]
    opt = torch.optim.Adam(params, lr=cfg.planner_lr)
    losses = []
    for step in range(cfg.planner_steps):
        idx = range(step * cfg.planner_batch, (step + 1) * cfg.planner_batch)
        pairs = [planner_example(cfg.seed, i, cfg.shape, cfg.share) for i in idx]
        n = max(len(t) for _, t in pairs)
        tokens = torch.tensor([t + [END] * (n - len(t)) for _, t in pairs])
        lengths = torch.tensor([len(t) for _, t in pairs])
        loss = planner_loss(planner, tokens, lengths, *text_states(text_encoder, [c for c, _ in pairs]))
        losses.append(_update(opt, loss, f"planner step {step}", step % 50 == 0 or step == cfg.planner_steps - 1, log))
    planner.requires_grad_(False).eval()
    return losses


# ============================================================================ renderer LoRA


def renderer_example(seed: int, index: int, shape: str, share: float) -> tuple[Scene, str, Layout]:
    """Scene `index` of `seed` (the new shape in a `share` of them), its paraphrased truth layout in a
    random object order and the layout's complete caption, as the layout renderer trains (recaption)."""
    scene, _ = new_word_example(seed, index, shape) if uses_word(seed, index, share) else shapes_example(seed, index)
    rng = np.random.default_rng([seed, index, 17])
    layout = scene_layout(scene, rng)
    layout = Layout(tuple(layout.objects[i] for i in rng.permutation(len(layout.objects))), scene.background)
    return scene, layout_caption(layout, rng), layout


def train_renderer_lora(pipe: Any, cfg: NewWordConfig, log: Callable[[str], None] = print) -> tuple[LoraNetwork,
                                                                                                  list[float]]:
    """A LoRA on the layout pipeline's U-Net (attached: the pipeline draws with it), trained on the
    v/eps loss of the renderer's own recipe. Returns the network and the step losses."""
    from t2i.systems.shapes_layout import encode_layouts

    for net in (pipe.unet, pipe.vae, pipe.text_encoder):
        net.requires_grad_(False).eval()
    for m in pipe.unet.modules():  # fused inference projections would bypass the hooks
        if hasattr(m, "unfuse_projections"):
            m.unfuse_projections()
    lora = LoraNetwork(select_layers(pipe, cfg.targets, None), cfg.rank, float(cfg.rank)).attach()
    params = list(lora.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.renderer_lr, weight_decay=0.0)
    s = pipe.schedule
    vae = pipe.vae
    loss_fn = (DecodedLoss(s.alphas_cumprod(), s.prediction_type, cfg.min_snr_gamma or None,
                           lambda z: vae.decode(vae.unscale(z)), cfg.pixel_weight, cfg.pixel_batch)
               if cfg.pixel_weight else DiffusionLoss(s.alphas_cumprod(), s.prediction_type, cfg.min_snr_gamma or None))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.renderer_steps):
        examples = [renderer_example(cfg.seed + 1, i, cfg.shape, cfg.share)
                    for i in range(step * cfg.renderer_batch, (step + 1) * cfg.renderer_batch)]
        x = torch.stack([to_tensor(render_array(scene, pipe.defaults.width)) for scene, _, _ in examples])
        with torch.no_grad():
            z = pipe.vae.scale(pipe.vae.encode(x).sample(gen)).float()
            cond = {"context": pipe.text_encoder.encode([c for _, c, _ in examples]).context.float(),
                    "layout": encode_layouts([lay for _, _, lay in examples], pipe.phrases, pipe.max_objects)}
        warm = min(1.0, (step + 1) / 20)  # a short warmup
        for group in opt.param_groups:
            group["lr"] = cfg.renderer_lr * warm
        loss = (loss_fn(pipe.unet, z, cond, gen, pixels=x) if isinstance(loss_fn, DecodedLoss)
                else loss_fn(pipe.unet, z, cond, gen))
        losses.append(_update(opt, loss, f"renderer step {step}", step % 50 == 0 or step == cfg.renderer_steps - 1,
                              log))
    return lora, losses


# ============================================================================ files


def save_new_word(out: Path, name: str, lora: LoraNetwork, planner: LayoutPlanner, meta: dict[str, Any]) -> Path:
    """`<out>/<name>.safetensors` (the renderer LoRA, kohya layout) and `<name>.planner.safetensors`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = write_lora(out / f"{name}.safetensors", lora.layers(),
                      {"ss_network_module": "networks.lora", "ss_output_name": name, "t2i_config": json.dumps(meta)})
    rows = {"new_token": planner.new_token.detach().float().contiguous(),  # type: ignore[union-attr]
            "new_head.weight": planner.new_head.weight.detach().float().contiguous(),  # type: ignore[union-attr]
            "new_head.bias": planner.new_head.bias.detach().float().contiguous()}  # type: ignore[union-attr]
    save_file(rows, str(out / f"{name}{PLANNER_SUFFIX}"), {"shapes": json.dumps(list(planner.new_shapes))})
    return path


def load_planner_word(planner: LayoutPlanner, path: str | Path) -> tuple[str, ...]:
    """Adds the shapes of a `<name>.planner.safetensors` file to `planner`, with their trained rows."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = tuple(json.loads(f.metadata()["shapes"]))
        rows = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    width = planner.cfg.width
    if rows["new_token"].shape != (len(shapes), width) or rows["new_head.weight"].shape != (len(shapes), width):
        raise ValueError(f"{path}: rows for a planner of width {rows['new_token'].shape[-1]}, this one has {width}")
    planner.add_shapes(shapes)
    with torch.no_grad():
        planner.new_token.copy_(rows["new_token"])  # type: ignore[union-attr]
        planner.new_head.weight.copy_(rows["new_head.weight"])  # type: ignore[union-attr]
        planner.new_head.bias.copy_(rows["new_head.bias"])  # type: ignore[union-attr]
    return shapes


def apply_new_word(pipe: Any, lora_file: str | Path, weight: float = 1.0, planner: bool = True) -> None:
    """Merges the renderer LoRA into `pipe` and, when the planner file is beside it (and `planner`),
    gives the pipeline's planner the new shape token."""
    from t2i.adapters.lora import apply_loras

    apply_loras(pipe, [(Path(lora_file), weight)])
    rows = Path(str(lora_file).removesuffix(".safetensors") + PLANNER_SUFFIX)
    if planner and rows.is_file() and pipe.planner is not None:
        load_planner_word(pipe.planner, rows)


def adapt(pipe: Any, cfg: NewWordConfig, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both stages on a loaded layout pipeline; writes the files (see the module docstring). Returns timings
    and final losses. The pipeline keeps the attached LoRA (reload it to draw with the merged file)."""
    if getattr(pipe, "planner", None) is None:
        raise ValueError(f"{pipe.name}: teaching a word needs the layout model's planner (t2i-shapes-layout)")
    t0 = time.time()
    p_losses = train_planner_word(pipe.planner, pipe.text_encoder, cfg, log)
    t1 = time.time()
    lora, r_losses = train_renderer_lora(pipe, cfg, log)  # (the loss includes the pixel term when pixel_weight)
    t2 = time.time()
    report = {"planner_s": t1 - t0, "renderer_s": t2 - t1, "planner_loss": [p_losses[0], p_losses[-1]],
              "renderer_loss": [float(np.mean(r_losses[:20])), float(np.mean(r_losses[-20:]))]}
    save_new_word(out, cfg.shape, lora, pipe.planner, {**cfg.__dict__, **report})
    lora.detach()
    return report
