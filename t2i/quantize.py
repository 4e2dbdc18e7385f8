"""int8 inference on the CPU: int8 weights (one scale per output channel) with dynamic int8
activations for the Linear layers of a U-Net (`t2i.load(precision="int8")`).

    quantize_linears(pipe.unet, t2i.has_vnni())  # every nn.Linear -> Int8Linear, in place
    y = layer(x)                                   # x (..., in) float32 or bf16 -> y (..., out), x's dtype

Which library, and why: PyTorch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`
packing for the oneDNN / fbgemm int8 GEMMs, which use AVX512-VNNI where the CPU has it), not
torchao. Measured on an AMD EPYC Zen 4 (family 25 model 17, AVX512-VNNI and AVX512-BF16), one
thread, a 4096x1280 @ 1280x1280 Linear: fp32 162 ms, bf16 69 ms (0.42), torch.ao dynamic int8 36
ms with the oneDNN packing (0.22; 40 ms, 0.25, with fbgemm), torchao 0.18's
`Int8DynamicActivationInt8WeightConfig` 60 ms (0.36). torch.ao is the faster of the two here and
needs no new dependency. torch.ao's eager quantization is marked for migration to torchao, so
everything that touches it is in this module: moving is replacing `quantize_linears`.

Activations: PyTorch's dynamic Linear forces `reduce_range=True` (7-bit activations), which fbgemm
needs on CPUs without VNNI (its u8 x s8 -> s16 pair sums saturate). With VNNI the products
accumulate in int32 and cannot saturate, so there `Int8Linear` packs for oneDNN and quantizes
activations to the full 8 bits: on the 1280x1280 layer the relative error falls from 2.3e-2 to
1.2e-2 at the same speed (36.5 ms against 36.0). Without VNNI it keeps PyTorch's 7-bit default.

What stays float, measured on the same CPU:
- Convolutions (bf16 where the CPU has native bf16, else float32): PyTorch's int8 convolution
  needs static quantization (calibrated activation scales). A 3x3 320->320 conv on (2, 320, 64,
  64) took 0.31 of fp32's time in int8 (quantize, conv, dequantize) against 0.42 in bf16
  channels-last: a further gain, not built here (it needs a calibration set per model).
- The text encoder: one activation scale per tensor cannot hold BERT's outlier features; int8
  MiniLM moved the built-in model's context by 0.13 of its norm and its images to 24-28 dB PSNR
  from fp32 (the int8 U-Net alone: 27-46 dB). It runs once per prompt, so it costs little time.
- Norms, attention softmax, the autoencoder and the samplers (float32).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from t2i.compact import is_compact, uncompact_


class Int8Linear(nnqd.Linear):
    """A dynamic int8 Linear that may quantize activations to the full 8 bits.

    Weights: int8, symmetric, one scale per output channel, packed once. Activations: quantized per
    call to uint8 with one scale and zero point per tensor (their min and max). full_range: 8-bit
    activations (only where VNNI makes that safe, see the module docstring), else 7-bit.
    Input (..., in_features) float32 or bf16 -> output (..., out_features) in the input's dtype.
    """

    full_range: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed_params._packed_params,
                                               reduce_range=not self.full_range)
        return y.to(x.dtype)

    def _get_name(self) -> str:
        return "Int8Linear"


@contextmanager
def _engine(name: str) -> Iterator[None]:
    """Pack weights for the quantized engine `name`; the packed weights keep it after we restore."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def quantize_linears(module: nn.Module, vnni: bool) -> nn.Module:
    """Replace every nn.Linear in `module` (in place) by an `Int8Linear` and return `module`.

    The float weights are dropped: only the packed int8 weights and float biases stay. Layers
    already quantized are left as they are. vnni: whether the CPU has int8 dot products
    (`t2i.has_vnni()`); with VNNI weights are packed for oneDNN and activations use 8 bits.
    """
    engines = torch.backends.quantized.supported_engines
    engine = "onednn" if vnni and "onednn" in engines else "x86" if "x86" in engines else "fbgemm"
    for layer in module.modules():
        if type(layer) is nn.Linear:
            # torch.ao copies a module's forward hooks onto its int8 replacement, so compact layers
            # (t2i.compact) are made plain first: their int8 weights come from the rounded values
            uncompact_(layer)
            layer.float()  # the observers need float32: from bf16 the packed layers failed (min > max)
    with _engine(engine), warnings.catch_warnings():
        # torch.ao warns on every call that eager quantization will move to torchao (module docstring)
        warnings.simplefilter("ignore")
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                         mapping={nn.Linear: Int8Linear}, inplace=True)
    for layer in int8_linears(module):
        layer.full_range = vnni
    return module


def int8_linears(module: nn.Module) -> list[nn.Module]:
    """The layers of `module` that hold int8 packed weights."""
    return [m for m in module.modules() if isinstance(m, Int8Linear)]


def precision_of(net: nn.Module) -> str:
    """"int8" (layers quantized here), "compact" (16-bit weights, float32 compute: t2i.compact),
    "bf16" or "fp32": what `net` computes in (PNG metadata)."""
    if int8_linears(net):
        return "int8"
    if is_compact(net):
        return "compact"
    return "fp32" if next(net.parameters()).dtype == torch.float32 else "bf16"
