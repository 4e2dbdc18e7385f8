"""Exponential moving average of a model's weights (the weights we ship and sample from)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` to hold the averaged weights."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].lerp_(p.detach(), 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)


def ema_decay(step: int, max_decay: float) -> float:
    """Decay ramped up over the first steps (an average over random init is useless early on):
    min(max_decay, (1 + step) / (10 + step)), the warm-up of the LDM/diffusers EMA."""
    return min(max_decay, (1 + step) / (10 + step))


class EMA:
    """The averaged copy of `model` and its update, for `fit` to call after every optimizer step."""

    def __init__(self, model: nn.Module, max_decay: float) -> None:
        self.model, self.max_decay = model, max_decay
        self.averaged = make_ema(model)

    def update(self, step: int) -> None:
        update_ema(self.averaged, self.model, ema_decay(step, self.max_decay))
