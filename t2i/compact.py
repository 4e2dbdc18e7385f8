"""Compact weights: a network's large weights kept in 16 bits and widened one layer at a time to
float32 when that layer runs, so the model holds about half its float32 bytes and computes exactly
as float32 does on the same (rounded) weights.

    compact_(pipe.unet)           # every Linear / conv / embedding weight -> bf16, widened per call
    y = pipe.unet(x, t, context)  # float32 in, float32 compute, float32 out
    uncompact_(pipe.unet)         # back to plain float32 layers (the rounded values)

Loaders read weight files straight into this form, tensor by tensor (`compact_cast` with
`t2i.checkpoints.io.load_state_dict`), so no float32 copy of the model is ever resident:
`t2i.systems.stable_diffusion.load(path, compact=torch.bfloat16)`.

What is compacted, and why (diffusers calls the idea "layerwise casting",
`ModelMixin.enable_layerwise_casting`; it casts the Conv/Linear layers and skips norms, positional
and patch embeddings by name): here the weight of every Linear, convolution and embedding of two or
more dimensions, which is where the bytes are (99.9% of the SD U-Net's); biases and norm scales are
vectors, cost nothing, and stay float32, as do buffers. One more parameter stays float32: the
network's first, because the pipelines read a network's compute dtype from `next(net.parameters())`
(`keep_first`; for the SD U-Net that is `conv_in`, 11k weights).

Exactness: a bf16 or fp16 value widened to float32 is exact, and the widened weight is what a float32
layer holding the rounded weight would see, so outputs are bit-identical to float32 on the rounded
weights (tests/test_compact.py). The cost is one cast per layer call (the U-Net's weights once per
step: 3.4 GB of float32 written per SD 1.5 step); in one run on 2 shared Zen 4 cores, 4 steps of SD 1.5
at 256x256 sampled in 1.2x float32's time (benchmarks/compact_memory.py; less at larger sizes, where
the convolutions dominate). At most one widened copy of a layer lives at a time: the hooks put the
16-bit tensor back when the layer returns (also when it raises). Not for torch.compile: freezing
would make every weight a float32 constant again.

Storage: bf16 keeps float32's range with 8 bits of mantissa (relative rounding error up to 2^-9);
fp16 has 11 bits (2^-12) but overflows past 65504, so a tensor beyond that is kept in bf16 instead
(`narrow`). A file whose weights are already 16-bit (most released SD checkpoints are fp16) keeps
them as stored when loaded compact: re-rounding fp16 to bf16 would lose 3 bits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

STORAGE_DTYPES = (torch.float16, torch.bfloat16)

# The layers whose `weight` is widened around their own forward. Subclasses count (t2i's Conv2d).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
          nn.Embedding)

Cast = Callable[[torch.Tensor], torch.Tensor]  # what a loader applies to each tensor it reads


def _check_storage(storage: torch.dtype) -> None:
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"compact storage must be one of {STORAGE_DTYPES}, got {storage}")


def compact_dtype(t: torch.Tensor, storage: torch.dtype, compute: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a tensor read from a weight file is kept in when loading compact: a floating tensor
    of 2+ dimensions (a Linear, conv or embedding weight) in `storage`, or as it is when already
    16-bit; vectors (biases, norm scales) and 0-d floats in `compute`; integers as they are."""
    if not t.is_floating_point():
        return t.dtype
    if t.dim() < 2:
        return compute
    return t.dtype if t.dtype in STORAGE_DTYPES else storage


def narrow(t: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """`t` (finite) in `storage`; a tensor past float16's range (65504) goes to bf16 instead, whose
    range is float32's, rather than holding infinities."""
    out = t.to(storage)
    if out.dtype == torch.float16 and t.dtype != torch.float16 and not torch.isfinite(out.sum(dtype=torch.float32)):
        return t.to(torch.bfloat16)
    return out


def compact_cast(storage: torch.dtype, compute: torch.dtype = torch.float32) -> Cast:
    """The cast a loader applies to each tensor as it is read (`compact_dtype`, then `narrow`)."""
    _check_storage(storage)

    def cast(t: torch.Tensor) -> torch.Tensor:
        dtype = compact_dtype(t, storage, compute)
        return narrow(t, dtype) if dtype in STORAGE_DTYPES else t.to(dtype)

    return cast


def loading_cast(storage: torch.dtype | None, dtype: torch.dtype | None) -> Cast | None:
    """A loader's per-tensor cast: for compact `storage`, or (storage None) to a 16-bit `dtype`,
    so that a bf16 or int8 load never holds the file's float32 copy of the whole model (SD 1.5's
    U-Net: 3.4 GB, mapped, beside its 1.7 GB of bf16); None: no cast (the file is memory-mapped
    and cast, if at all, when assigned). Compact weights compute in float32, so a compact load must
    ask for dtype float32 (ValueError otherwise)."""
    if storage is None:
        return _floats_to(dtype) if dtype in STORAGE_DTYPES else None
    if dtype != torch.float32:
        raise ValueError(f"compact weights compute in float32; the load asked for {dtype}")
    return compact_cast(storage)


def _floats_to(dtype: torch.dtype) -> Cast:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return cast


class _Widen:
    """The forward hooks of one compact layer: widen its weight to `compute` before it runs, put the
    stored 16-bit tensor back after it returns. Counted under a lock, so that threads running the
    same network at once share one widened copy and the last one out puts the storage back."""

    def __init__(self, layer: nn.Module, compute: torch.dtype) -> None:
        self.compute, self.depth, self.stored = compute, 0, None
        self.lock = threading.Lock()
        self.handles = (layer.register_forward_pre_hook(self.widen),
                        layer.register_forward_hook(self.narrow, always_call=True))

    def widen(self, layer: nn.Module, args: tuple) -> None:
        with self.lock:
            self.depth += 1
            if self.depth == 1:
                self.stored = layer.weight.data
                layer.weight.data = self.stored.to(self.compute)

    def narrow(self, layer: nn.Module, args: tuple, output: object) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                layer.weight.data, self.stored = self.stored, None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _widener(layer: nn.Module) -> _Widen | None:
    return layer.__dict__.get("_t2i_compact")


def compact_(module: nn.Module, storage: torch.dtype = torch.bfloat16, compute: torch.dtype = torch.float32,
             keep_first: bool = True) -> nn.Module:
    """Make `module` compact in place and return it: the 2+-dimensional floating weight of every
    layer in `LAYERS` is cast to `storage` (left as it is when already 16-bit, e.g. loaded compact)
    and widened to `compute` around each call; every other floating parameter and buffer is put in
    `compute` (and copied, so none keeps a memory-mapped weight file resident). keep_first: the
    module's first parameter stays in `compute` too (see the module docstring). Layers already
    compact and int8 layers (`t2i.quantize`, not in LAYERS) are left as they are."""
    _check_storage(storage)
    first = next(module.parameters(), None) if keep_first else None
    compacted = set()
    for layer in module.modules():
        w = getattr(layer, "weight", None)
        if not isinstance(layer, LAYERS) or not isinstance(w, nn.Parameter) or not w.is_floating_point() \
                or w.dim() < 2 or w is first:
            continue
        compacted.add(w)
        if _widener(layer) is not None:
            continue
        if w.dtype not in STORAGE_DTYPES:
            w.data = narrow(w.data, storage)
        layer.__dict__["_t2i_compact"] = _Widen(layer, compute)
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point() and t not in compacted:
            t.data = t.data.to(compute, copy=True)
    return module


def uncompact_(module: nn.Module) -> nn.Module:
    """Undo `compact_` in place: the hooks removed and each compact weight widened for good (the
    rounded values, so the module computes as it did). Returns `module`."""
    for layer in module.modules():
        widen = _widener(layer)
        if widen is not None:
            widen.remove()
            del layer.__dict__["_t2i_compact"]
            layer.weight.data = layer.weight.data.to(widen.compute)
    return module


def is_compact(module: nn.Module) -> bool:
    """Whether any layer of `module` holds a compact weight."""
    return any(_widener(m) is not None for m in module.modules())


def parameter_bytes(module: nn.Module) -> int:
    """The bytes of `module`'s parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
