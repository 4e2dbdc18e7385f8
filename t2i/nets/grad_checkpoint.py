"""Gradient checkpointing for t2i's U-Nets (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

`enable_gradient_checkpointing(unet)` makes every ResBlock and SpatialTransformer of a network run under
`torch.utils.checkpoint` (non-reentrant) while autograd records: the block keeps only its inputs, and
its inner activations (norms, attention projections, feed-forward) are recomputed in the backward pass,
one block at a time. Gradients are the same; the cost is one more forward of those blocks per step.

What it saves is the activations, not the weights, gradients or optimizer state. Measured on the SD 1.5
U-Net (860M parameters, batch 1, fp32, `benchmarks/sd_finetune_memory.py`): one 512x512 sample's
activations are ~1.4 GB above the 3.75 GB of weights and 3.44 GB of gradients, checkpointing halves
them (peak RSS 8.59 -> 7.88 GB with SGD; 7.55 -> 7.41 GB at 256 px). The saving grows with the batch
and the image size; AdamW's two moments (6.9 GB) stay what they are.

The wrapping is a bound method per module instance (the class and the state dict are untouched), so a
deep copy (an EMA of the network) carries it to its own modules. Under `torch.no_grad` (sampling, a
held-fixed evaluation) the blocks run plainly, with their inference fast paths.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from t2i.nets.resnet import ResBlock
from t2i.nets.spatial_attention import SpatialTransformer

CHECKPOINTED = (ResBlock, SpatialTransformer)  # the blocks whose activations are recomputed


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's forward under a non-reentrant checkpoint while autograd records, plainly otherwise."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    # Non-reentrant: works with keyword arguments and with inputs that need no grad (the frozen text
    # context), and recomputes under the autocast state of the forward pass.
    return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(net: nn.Module) -> int:
    """Checkpoint every ResBlock and SpatialTransformer of `net` (a t2i U-Net, or any network made of
    them); returns how many blocks are wrapped (0 for a network without them). Calling it again is
    harmless: a block is never wrapped twice."""
    wrapped = 0
    for m in net.modules():
        if isinstance(m, CHECKPOINTED):
            m.forward = types.MethodType(_checkpointed_forward, m)  # type: ignore[method-assign]
            wrapped += 1
    return wrapped


def disable_gradient_checkpointing(net: nn.Module) -> int:
    """Undo `enable_gradient_checkpointing`: the blocks run their class's forward again; returns how many."""
    unwrapped = 0
    for m in net.modules():
        if isinstance(m, CHECKPOINTED) and "forward" in vars(m):
            del m.forward
            unwrapped += 1
    return unwrapped
