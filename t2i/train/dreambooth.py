"""DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2) for `t2i train lora --class-prompt`.

A subject is bound to a rare token by fine-tuning on a few of its images captioned with it ('a sks
dog'); so that the class word itself ('dog') does not drift to the subject, the frozen model first
draws `class_images` images of the class prompt, and every step adds their denoising loss:

    L = E ||x_hat(z_t, c_inst) - x||^2 + lambda * E ||x_hat(z'_t, c_class) - x'||^2     (eq. 2)

with x the instance images, x' the class images (the model's own prior), lambda = `prior_weight`.

The class images live in `<out>/class_images/` (PNG + `.txt` sidecar holding the class prompt); a run
that finds some there (a resumed run, or images the user put there) draws only the missing ones, as
diffusers' DreamBooth script does. Image i is drawn with seed i and the model's default sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from t2i.data.folder import IMAGE_SUFFIXES


def check_prior(class_prompt: str, class_images: int, prior_weight: float) -> None:
    """Refuse settings that would silently train without (or with a meaningless) prior."""
    if class_images < 0 or prior_weight < 0:
        raise ValueError(f"--class-images ({class_images}) and --prior-weight ({prior_weight}) must be >= 0")
    if class_images and not class_prompt:
        raise ValueError("--class-images needs --class-prompt (the class the subject belongs to, e.g. 'a dog')")
    if class_prompt and not class_images:
        raise ValueError("--class-prompt needs --class-images N > 0 (DreamBooth uses about 100-200 per subject)")


@torch.no_grad()
def write_class_images(pipe: Any, prompt: str, n: int, folder: Path, size: int, steps: int | None,
                       log: Callable[[str], None] = print) -> Path:
    """Draw the missing ones of n class images of `prompt` (seed i for image i) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if have < n:
        log(f"drawing {n - have} class images of {prompt!r} with the frozen model into {folder}")
    for i in range(have, n):
        image = pipe.generate(prompt, seed=i, steps=steps, width=size, height=size).images[0]
        image.save(folder / f"class_{i:05d}.png")
        (folder / f"class_{i:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
    return folder


def with_prior(loss: Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor], weight: float,
               instance: tuple[torch.Tensor, Any], prior: tuple[torch.Tensor, Any] | None,
               gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """eq. 2: loss(instance) + weight * loss(class images), and both terms for the log; without a prior
    batch, the instance loss alone."""
    inst = loss(*instance, gen)
    if prior is None:
        return inst, {}
    cls = loss(*prior, gen)
    return inst + weight * cls, {"lora/instance_loss": inst.item(), "lora/prior_loss": cls.item()}
