"""`t2i train lora` on the layout model (`t2i-shapes-layout`), and teaching it a shape word it never saw
(issue 21), e.g. `--new-word ring`. The step function for `t2i.train.fit`, picked by `t2i.train.lora_run`.

The layout model draws every image from a layout (boxes, each with a phrase) and, since it recaptions, from
the layout's complete caption; its LoRA trains the same way: on shapes-world scenes (`--data shapes`) with
their truth layouts (paraphrased phrases in a random order, `layout_example`) and the caption the pipeline
would write for them. Training without layouts would adapt the U-Net's no-layout mode, which it never draws in.

A new word must pass both of the model's learned stages:
- the planner writes each object's shape as a token of a closed set (`t2i.layout.planner.VALUES`), so it
  gets a new token: one input-embedding row and one output-head row (`LayoutPlanner.add_shapes`; textual
  inversion's new embedding row, Gal et al. 2022), trained alone on the planner's teacher-forced loss during
  the run's first `planner_steps` steps, over captions that name the word (their truth layouts) and ordinary
  ones (so the new row learns not to fire on the old words); the rest of the planner stays frozen;
- the renderer reads the phrase ('a red ring') and the recaptioned prompt, but never drew a ring: the LoRA
  (Hu et al. 2021) trains on scenes whose first object's kind is drawn as the new shape (`new_word_example`).
`--replay N` adds N ordinary world scenes to each step, weighted by `--prior-weight` (DreamBooth's prior
preservation, eq. 2, with the world's own scenes as the class images): `--replay-target truth` regresses them
on their truth, `base` on the frozen model's own prediction at the same noisy input (the LoRA's hooks off),
so the LoRA is pulled back to what the base already does on the old words.

Files (`export`, read back by `apply_new_word`): `<name>.safetensors`, the LoRA in the kohya layout (what
`--lora` reads), and with a new word `<name>.planner.safetensors`, the planner's new rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2i.checkpoints.io import save_state_dict
from t2i.data.shapes.datasets import default_exclude, to_tensor
from t2i.data.shapes.layouts import layout_example, scene_layout
from t2i.data.shapes.new_words import new_word_example, new_word_prompts, with_new_shape
from t2i.data.shapes.rendering import render_array
from t2i.data.shapes.world import NEW_SHAPES, Scene
from t2i.diffusion.losses import DecodedLoss, DiffusionLoss
from t2i.layout.captions import layout_caption
from t2i.layout.planner import END, LayoutPlanner, encode_layout, planner_loss, text_states
from t2i.layout.planner_data import planner_pair
from t2i.layout.spec import Layout
from t2i.train.fit import Grid, Run, Step, Task
from t2i.train.loop import batch_indices
from t2i.train.lora import (
    EVAL_SEED,
    FrozenModel,
    LoraTrainConfig,
    attach_lora,
    export_lora,
    lora_alpha,
    select_layers,
)

# The layers the new word's LoRA is measured on (scripts/new_word_demo.py): attention, MLP and layout input.
RENDERER_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,phrase_proj,layout_in"
PLANNER_SUFFIX = ".planner.safetensors"
REPLAY_TARGETS = ("truth", "base")


def uses_word(seed: int, index: int, share: float) -> bool:
    """Whether example `index` of `seed` is a new-word one (a pure function of the two)."""
    return bool(np.random.default_rng([seed, index, 21]).random() < share)


# ============================================================================ planner rows


def planner_example(seed: int, index: int, shape: str, share: float) -> tuple[str, list[int]]:
    """(caption, layout tokens) of planner pair `index` of `seed`, with the new shape for a `share` of them."""
    pair = planner_pair(seed, index)
    scene, caption = Scene(pair.objects, pair.background), pair.caption
    if uses_word(seed, index, share):
        scene, caption = with_new_shape(scene, caption, shape)
    return caption, encode_layout(scene.background, scene.objects, (shape,))


class PlannerRows(nn.Module):
    """The planner's new shape rows as one module, what the run trains and checkpoints: the planner's own
    `new_token` (K, width) and `new_head` (width -> K), shared with it, not copied."""

    def __init__(self, planner: LayoutPlanner) -> None:
        super().__init__()
        if planner.new_token is None:
            raise ValueError("the planner has no new shapes (LayoutPlanner.add_shapes first)")
        self.token = planner.new_token
        self.head = planner.new_head


def planner_batch(text_encoder: Any, seed: int, indices: list[int], shape: str, share: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`planner_loss`'s inputs for the pairs at `indices`: END-padded tokens (B, N), lengths (B,), the
    captions' text states (B, T, D) and mask."""
    pairs = [planner_example(seed, i, shape, share) for i in indices]
    n = max(len(t) for _, t in pairs)
    tokens = torch.tensor([t + [END] * (n - len(t)) for _, t in pairs])
    lengths = torch.tensor([len(t) for _, t in pairs])
    return tokens, lengths, *text_states(text_encoder, [c for c, _ in pairs])


def save_planner_rows(path: Path, planner: LayoutPlanner) -> Path:
    """The planner's new rows and their shape names (`load_planner_word` reads them)."""
    rows = {"new_token": planner.new_token.detach().float().contiguous(),  # type: ignore[union-attr]
            "new_head.weight": planner.new_head.weight.detach().float().contiguous(),  # type: ignore[union-attr]
            "new_head.bias": planner.new_head.bias.detach().float().contiguous()}  # type: ignore[union-attr]
    save_state_dict(rows, path, {"shapes": json.dumps(list(planner.new_shapes))})
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
    """Merges the LoRA into `pipe` and, when the planner file is beside it (and `planner`), gives the
    pipeline's planner the new shape token."""
    from t2i.adapters.lora import apply_loras

    apply_loras(pipe, [(Path(lora_file), weight)])
    rows = Path(str(lora_file).removesuffix(".safetensors") + PLANNER_SUFFIX)
    if planner and rows.is_file() and pipe.planner is not None:
        load_planner_word(pipe.planner, rows)


# ============================================================================ scenes with layouts


def layout_scene(seed: int, index: int, word: str | None, recaption: bool) -> tuple[Scene, str, Layout]:
    """Scene `index` of `seed` (with `word` drawn for its first object's kind when given), its paraphrased
    truth layout and the caption the model reads: with `recaption` the layout's complete caption (objects
    in a random order), as the pipeline rewrites prompts; else one of the scene's true captions."""
    if word is None:
        return layout_example(seed, index, default_exclude(), recaption=recaption)
    scene, caption = new_word_example(seed, index, word)
    rng = np.random.default_rng([seed, index, 17])
    layout = scene_layout(scene, rng)
    if recaption:
        layout = Layout(tuple(layout.objects[i] for i in rng.permutation(len(layout.objects))), scene.background)
        caption = layout_caption(layout, rng)
    return scene, caption, layout


def build_layout_lora(cfg: LoraTrainConfig, run: Run, frozen: FrozenModel) -> Task:
    """The LoRA run on a layout pipeline (see the module docstring)."""
    from t2i.systems.shapes_layout import encode_layouts

    pipe, info = frozen.pipe, run.info
    if cfg.data != "shapes":
        raise ValueError(f"{pipe.name} draws every image from a layout, and --data {cfg.data} has none: train it on "
                         "--data shapes (the world's scenes with their truth layouts; --new-word W for a new shape)")
    if cfg.text_encoder or cfg.class_prompt or cfg.class_images:
        raise ValueError(f"{pipe.name}: --text-encoder and DreamBooth class images are for SD models; the layout "
                         "model's prior preservation is --replay N (ordinary world scenes)")
    if cfg.replay_target not in REPLAY_TARGETS or cfg.replay < 0:
        raise ValueError(f"--replay-target must be one of {REPLAY_TARGETS} and --replay >= 0")
    word = cfg.new_word or None
    if word is not None and word not in NEW_SHAPES:
        raise ValueError(f"--new-word {word!r}: the shapes world draws the new shapes {sorted(NEW_SHAPES)}")
    rows = None
    if word is not None and cfg.planner_steps:
        if pipe.planner is None:
            raise ValueError(f"{pipe.name} has no planner: --new-word teaches the planner too (--planner-steps 0 "
                             "for the renderer alone)")
        pipe.planner.requires_grad_(False).eval()
        pipe.planner.add_shapes((word,))  # on --resume the checkpoint then overwrites these fresh rows
        rows = PlannerRows(pipe.planner)
    layers = select_layers(pipe, cfg.unet_targets, None)
    alpha = lora_alpha(cfg.rank, cfg.alpha)
    net = attach_lora(pipe, layers, cfg.rank, alpha)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    optimizers: dict[str, torch.optim.Optimizer] = {"opt": opt}
    if rows is not None:  # the loop's schedule times lr_scale: the rows learn at planner_lr
        optimizers["planner_opt"] = torch.optim.Adam([{"params": list(rows.parameters()),
                                                       "lr_scale": cfg.planner_lr / cfg.lr}], lr=cfg.planner_lr)
    unet, vae, s = pipe.unet, pipe.vae, pipe.schedule
    latent_loss = DiffusionLoss(s.alphas_cumprod(), s.prediction_type, cfg.min_snr_gamma or None)
    pixel_loss = (DecodedLoss(s.alphas_cumprod(), s.prediction_type, cfg.min_snr_gamma or None,
                              lambda z: vae.decode(vae.unscale(z)), cfg.pixel_weight, cfg.pixel_batch)
                  if cfg.pixel_weight else None)
    done = {"steps": 0}

    def encoded(scenes: list[tuple[Scene, str, Layout]], gen: torch.Generator, dropout: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(latents (B, C, h, w), the U-Net's conditioning with the layouts (B, max_objects, 5 + E), pixels)."""
        x = torch.stack([to_tensor(render_array(scene, frozen.size)) for scene, _, _ in scenes])
        drop = (torch.rand(len(scenes), generator=gen) < dropout).tolist()
        captions = ["" if d else c for (_, c, _), d in zip(scenes, drop, strict=True)]
        z = vae.scale(vae.encode(x).sample(gen)).float()
        cond = pipe.network_conditioning(pipe.text_encoder.encode(captions), frozen.size, frozen.size, 6.0)
        cond = {k: v.float() for k, v in cond.items()}
        cond["layout"] = encode_layouts([lay for _, _, lay in scenes], pipe.phrases, pipe.max_objects)
        return z, cond, x

    def prepare(position: int, gen: torch.Generator) -> tuple[Any, Any, Any]:
        """The step's scenes (with the word), its replayed ordinary scenes and the planner's batch, each
        a pure function of the position (exact resume)."""
        k = position // (cfg.batch_size * info.world_size)  # the step
        idx = batch_indices(position, cfg.batch_size, info, None, cfg.seed)
        main = encoded([layout_scene(cfg.seed, i, word, pipe.recaption) for i in idx], gen, cfg.caption_dropout)
        replay = None
        if cfg.replay:
            ridx = batch_indices(k * cfg.replay * info.world_size, cfg.replay, info, None, cfg.seed + 1)
            replay = encoded([layout_scene(cfg.seed + 1, i, None, pipe.recaption) for i in ridx], gen)
        plan = None
        if rows is not None and k < cfg.planner_steps:
            pidx = batch_indices(k * cfg.planner_batch * info.world_size, cfg.planner_batch, info, None, cfg.seed)
            plan = planner_batch(pipe.text_encoder, cfg.seed, pidx, word, cfg.planner_share)  # type: ignore[arg-type]
        return main, replay, plan

    def truth(part: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        z, cond, x = part
        return pixel_loss(unet, z, cond, gen, pixels=x) if pixel_loss is not None else latent_loss(unet, z, cond, gen)

    def base(part: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """The squared distance to the frozen model's prediction at the same (x_t, t), every t weighted
        alike: Min-SNR's v weight is ~0 near t = T, where the sampler's first steps decide the composition
        and the background (measured on the ring: Min-SNR-weighted, the held-out score fell 0.867 -> 0.713 on
        seed 0; weighted alike, 0.848 -> 0.840 over seeds 0-2; scripts/new_word_demo.py)."""
        z, cond, _ = part
        t, _, _, x_t = latent_loss.noised(z, gen)
        out = unet(x_t, t.float(), **cond)
        with torch.no_grad(), net.bypassed():
            ref = unet(x_t, t.float(), **cond)
        return ((out.float() - ref.float()) ** 2).mean()

    def step(batch: tuple[Any, Any, Any], st: Step) -> dict[str, float]:
        main, replay, plan = batch
        loss = truth(main, st.generator)
        logs: dict[str, float] = {}
        if replay is not None:
            kept = (truth if cfg.replay_target == "truth" else base)(replay, st.generator)
            logs = {"lora/instance_loss": loss.item(), "lora/replay_loss": kept.item()}
            loss = loss + cfg.prior_weight * kept
        gnorm = st.update(loss, opt, params, average=params)
        if plan is not None:
            p = planner_loss(pipe.planner, *plan)
            st.update(p, optimizers["planner_opt"], None, "planner loss", average=list(rows.parameters()))
            logs["lora/planner_loss"] = p.item()
        done["steps"] = st.index + 1
        return {"lora/loss": loss.item(), "lora/grad_norm": gnorm, **logs}

    def export() -> None:
        path = export_lora(cfg, net, done["steps"])
        if rows is not None:
            save_planner_rows(path.with_name(f"{cfg.name}{PLANNER_SUFFIX}"), pipe.planner)

    @torch.no_grad()
    def evaluate(at: int) -> None:
        """The loss at fixed noise on `eval_items` held-back scenes (with the word), from their layouts."""
        gen = torch.Generator().manual_seed(EVAL_SEED)
        scenes = [layout_scene(EVAL_SEED, i, word, pipe.recaption) for i in range(cfg.eval_items)]
        z, cond, _ = encoded(scenes, gen)
        run.log.scalars(at, {"lora/fixed_loss": latent_loss(unet, z, cond, gen).item()})

    if cfg.sample_prompts:
        prompts = list(cfg.sample_prompts)
    elif word is not None:  # the word's prompts of a seed no training uses, and one without it
        prompts = [p for _, p in new_word_prompts(3, word)] + ["a red circle above a blue square"]
    else:
        prompts = ["a red circle", "a small purple cross on the left", "a red circle above a blue square",
                   "a green triangle on a black background"]

    @torch.no_grad()
    def grid() -> Grid:
        """The prompts drawn as the pipeline draws them (its planner's layout, seed 0), the LoRA on."""
        images = [pipe.generate(p, seed=0).images[0] for p in prompts]
        return Grid(torch.stack([to_tensor(np.array(im)) for im in images]), prompts, nrow=len(prompts))

    modules: dict[str, nn.Module] = {"lora": net} if rows is None else {"lora": net, "planner_rows": rows}
    about = (f", {len(layers)} layers of {pipe.name} (rank {cfg.rank}, alpha {alpha:g}, "
             f"{sum(p.numel() for p in params) / 1e6:.3f}M parameters) on shapes scenes with their layouts"
             + (f", new word {word!r}" + (f" (planner rows for {cfg.planner_steps} steps)" if rows else "")
                if word else "") + (f", {cfg.replay} replayed scenes a step ({cfg.replay_target})"
                                    if cfg.replay else ""))
    return Task("lora", modules, optimizers, prepare=prepare, step=step, grid=grid, grid_name="lora",
                export=export, evaluate=evaluate, about=about)

