"""`t2i train lora`: one run for every model, the task picked by what the model draws from. The layout
model (boxes and phrases with every image) trains by `t2i.train.new_word.build_layout_lora`, every
caption-only model by `t2i.train.lora.build_plain_lora`; this module imports both, so that neither
imports the other."""

from __future__ import annotations

from t2i.train.fit import Run, Task, fit
from t2i.train.lora import FrozenModel, LoraTrainConfig, build_plain_lora, check_text_encoder, is_layout_pipeline
from t2i.train.new_word import build_layout_lora


def build_lora(cfg: LoraTrainConfig, run: Run) -> Task:
    """The frozen model loaded once, then its LoRA task."""
    frozen = FrozenModel(cfg, run)
    check_text_encoder(cfg, frozen.pipe)
    if is_layout_pipeline(frozen.pipe):
        return build_layout_lora(cfg, run, frozen)
    return build_plain_lora(cfg, run, frozen)


def train_lora(cfg: LoraTrainConfig, resume: bool = False, resume_lr: float | None = None,
               given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a LoRA training. Returns the exit code."""
    return fit(cfg, build_lora, resume=resume, resume_lr=resume_lr, given=given)
