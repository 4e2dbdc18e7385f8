"""int8 inference on the CPU: int8 weights (one scale per output channel) with dynamic int8
activations for the Linear layers and the 3x3 convolutions of a U-Net (`t2i.load(precision="int8")`).

    quantize_(pipe.unet, t2i.has_vnni())  # nn.Linear -> Int8Linear, k x k nn.Conv2d -> Int8Conv2d, in place
    y = layer(x)                          # x float32 or bf16 -> y in x's dtype

How: oneDNN's int8 GEMM and convolution (PyTorch's `torch.ops.onednn.qlinear_pointwise` and
`qconv2d_pointwise`, the kernels PyTorch's own x86 int8 inference lowers to), with the weights
quantized and packed once here and the activations quantized per call from their own range
(dynamic quantization: no calibration set, so it works on any checkpoint). The output comes back in
the input's dtype, dequantized inside the kernel. Nothing else is needed: no torchao, no torch.ao
eager modules (marked for removal).

Why these kernels, measured on an AMD EPYC Zen 4 (family 25 model 17, AVX512-VNNI and AVX512-BF16),
one thread, session 14:
- Convolutions, (2, C, H, W) 3x3: fp32 148 / 131 / 158 / 60 ms at 320ch 64x64 / 640ch 32x32 /
  1280ch 16x16 / 1280ch 8x8; bf16 0.46 / 0.51 / 0.43 / 0.36 of fp32; oneDNN int8 with the input
  quantized per call 0.31 / 0.29 / 0.27 / 0.29 (timed with torch.quantize_per_tensor as the
  quantizer; `quantize_activations` here takes the same time: 2.75 against 2.81 ms on (2, 320, 64, 64)
  in bf16). PyTorch's own int8 convolution needs static
  (calibrated) quantization. 1x1 convolutions gain nothing (int8 0.66-0.81 of fp32 against bf16's
  0.57): they stay float.
- Linears, (2, 4096, 320) -> 2560: fp32 176 ms, bf16 0.49, torch.ao's dynamic int8 Linear 0.55
  (it widens bf16 inputs to float32 and narrows its output: two copies), oneDNN here 0.31; on
  small token counts the two int8 paths are even (0.26-0.35). An earlier measurement (session 6)
  of torchao 0.18's `Int8DynamicActivationInt8WeightConfig` on a 1280x1280 layer: 0.36 of fp32
  against torch.ao's 0.22; it is not used.

Activations: asymmetric uint8 with one scale and zero point per tensor (its min and max), all 8 bits.
With VNNI the u8 x s8 products accumulate in int32 and cannot saturate: weights use -127..127. Without
VNNI (AVX2, AVX-512 before VNNI) oneDNN sums pairs of products in int16 (vpmaddubsw), which 255 x 127
x 2 overflows (measured on a Zen 3: a layer of ones gave 32.4 for 64); the weights then get -63..63,
so a pair sums to at most 2 x 255 x 63 = 32130. PyTorch's dynamic quantization cuts the activations
to 7 bits instead (`reduce_range`); per-channel weights lose less than per-tensor activations:
relative error of a random 1280x1280 Linear 1.4e-2 with 7-bit weights against 2.3e-2 with 7-bit
activations, a 3x3 convolution 1.3e-2 against 2.1e-2 (Zen 3, session 15; with VNNI, 8 and 8 bits:
1.2e-2).

What stays float, measured on the same CPU:
- The text encoder: one activation scale per tensor cannot hold BERT's outlier features; int8
  MiniLM moved the built-in model's context by 0.13 of its norm and its images to 24-28 dB PSNR
  from fp32 (the int8 U-Net alone: 27-46 dB). It runs once per prompt, so it costs little time.
- An upsampler with an int8 convolution upsamples, then convolves (`t2i.nets.resample.Upsample`):
  its fused float path (four 2x2 convolutions of the small map) needs the float kernel. The U-Net
  passes its skips' size to its upsamplers, so it takes that path anyway.
- Norms, attention, the autoencoder and the samplers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from t2i.compact import is_compact


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x (any shape, float) -> (q, scale, zero_point): q uint8 of x's shape with x ~ (q - zero_point)
    * scale, the range [min(x, 0), max(x, 0)] mapped onto 0..255."""
    qmax = 255
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise FloatingPointError(f"an int8 layer got non-finite inputs (min {lo}, max {hi}): the network "
                                 "overflowed; try precision fp32")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / qmax or 1.0  # an all-zero input: any scale represents it
    zero_point = min(max(round(-lo / scale), 0), qmax)
    # In float32: quantizing a bf16 x in bf16 was no faster and moved an SD 1.5 U-Net's output by
    # 3.4e-2 of its norm (double rounding), session 14. Three passes: x / scale + zero_point + 0.5 in
    # one (torch.add's alpha scales x), the clamp, and the cast, whose truncation then rounds (half
    # up). Against div/round/add/clamp on a float32 copy: 20 against 35 ms on (8192, 1280), 3.9
    # against 5.8 on (2, 320, 64, 64), about even on small tensors; a guided SD 1.5 step at 64x64
    # latents 12.5 against 13.0 s, faster in each of 4 alternated rounds (Zen 3, 2 threads, session 15).
    q = torch.empty_like(x, dtype=torch.float32)  # x's memory format (int8 convolutions answer channels-last)
    # a 1-element tensor, not a 0-dim one: that would leave a bf16 x's sum in bf16 (rounded to 1 code in 255)
    torch.add(torch.tensor([zero_point + 0.5]), x, alpha=1 / scale, out=q)
    return q.clamp_(0, qmax).to(torch.uint8), scale, zero_point


def weight_qmax(vnni: bool) -> int:
    """The largest int8 weight magnitude: 127 where products accumulate in int32 (VNNI), else 63 (pairs
    of u8 x s8 products summed in int16 must not saturate: 2 * 255 * 63 <= 32767)."""
    return 127 if vnni else 63


WEIGHT_CHUNK = 1 << 20  # float32 elements per step of `quantize_weight`: 4 MB (fastest of 2^16..2^26)


def quantize_weight(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """w (O, ...) float -> (int8 weights of w's shape, float32 scales (O,)): symmetric, one scale per
    output channel, w ~ q * scale[o], q in -qmax..qmax (each channel's largest weight at qmax).

    A few output channels at a time, so that the float32 copy and the passes over it stay in cache:
    memory bandwidth, not arithmetic, sets the time. A 1280x2560x3x3 weight on 2 quiet Zen 4 cores:
    0.012 s in chunks of WEIGHT_CHUNK, 0.090 s whole; an SD 1.5 load with int8 takes 6.6 s against
    bf16's 4.5 s."""
    rows = w.detach().flatten(1)
    q = torch.empty(rows.shape, dtype=torch.int8)
    scale = torch.empty(rows.shape[0])
    step = max(1, WEIGHT_CHUNK // max(rows.shape[1], 1))
    for i in range(0, rows.shape[0], step):
        chunk = rows[i:i + step].to(torch.float32, copy=True)
        absmax = chunk.abs().amax(1)
        s = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        q[i:i + step] = chunk.mul_((1 / s)[:, None]).round_().clamp_(-qmax, qmax)
        scale[i:i + step] = s
    return q.view(w.shape), scale


class _Int8Layer(nn.Module):
    """What the int8 layers share: the per-channel weight scales, zero zero-points and a float32 bias as
    buffers; the packed weights (opaque oneDNN tensors) are plain attributes, not in the state dict."""

    def _take_weights(self, layer: nn.Linear | nn.Conv2d, vnni: bool) -> torch.Tensor:
        """Keep `layer`'s scales and bias; return its int8 weights (-127..127 with VNNI, else -63..63: the
        module docstring), for the subclass to pack."""
        self.vnni = vnni
        # a compact layer's stored 16-bit weight: its rounded values
        q, scale = quantize_weight(layer.weight, weight_qmax(vnni))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(scale.shape[0], dtype=torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        return q


class Int8Linear(_Int8Layer):
    """An nn.Linear in int8: weights packed once for oneDNN, activations quantized per call.

    Input (..., in_features) float32 or bf16 -> output (..., out_features) in the input's dtype.
    """

    def __init__(self, linear: nn.Linear, vnni: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.onednn.qlinear_prepack(self._take_weights(linear, vnni), None)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weights (out_features, in_features), unpacked."""
        return self.packed.to_dense().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zero_point = quantize_activations(x.reshape(-1, self.in_features))
        y = torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, self.packed, self.weight_scale,
                                               self.weight_zero_point, self.bias, 1.0, 0, x.dtype, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, vnni={self.vnni}"


class Int8Conv2d(_Int8Layer):
    """An nn.Conv2d (zero padding given as numbers) in int8, as `Int8Linear`.

    Input (B, C_in, H, W) float32 or bf16 -> (B, C_out, H', W') in the input's dtype, channels-last.
    """

    def __init__(self, conv: nn.Conv2d, vnni: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.groups = conv.kernel_size, conv.groups
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        q = self._take_weights(conv, vnni)
        self.packed = torch.ops.onednn.qconv_prepack(q, self.weight_scale, 1.0, 0, self.stride, self.padding,
                                                     self.dilation, self.groups, None)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weights (C_out, C_in / groups, kh, kw), unpacked."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zero_point = quantize_activations(x)
        y = torch.ops.onednn.qconv2d_pointwise(q, scale, zero_point, self.packed, self.weight_scale,
                                               self.weight_zero_point, self.bias, self.stride, self.padding,
                                               self.dilation, self.groups, 1.0, 0, x.dtype, "none", [], "")
        return y  # channels-last, as oneDNN answers: making it contiguous cost 0.2 of 4.9 s an SD 1.5 step

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, vnni={self.vnni}")


MIN_CONV_CHANNELS = 32


def _quantizable_conv(layer: nn.Module) -> bool:
    """A k x k (k > 1) zero-padded convolution at least MIN_CONV_CHANNELS wide on both sides: the
    network's first and last convolutions (4 latent channels) cost little and keep float precision."""
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str) and layer.weight.dim() == 4
            and min(layer.in_channels, layer.out_channels) >= MIN_CONV_CHANNELS)


def quantize_(module: nn.Module, vnni: bool, convs: bool = True) -> nn.Module:
    """Replace (in place) every nn.Linear of `module` by an `Int8Linear` and, with convs, every k x k
    (k > 1) nn.Conv2d at least MIN_CONV_CHANNELS wide by an `Int8Conv2d`; return `module`.

    Layer by layer, so that at most one chunk of a layer's weights is float32 besides the model; the
    float weights are dropped. Compact layers (t2i.compact) are quantized from their stored, rounded values.
    vnni: whether the CPU has int8 dot products (`t2i.has_vnni()`): 8-bit weights, else 7-bit.
    """
    def replace(parent: nn.Module) -> None:  # recursive, so that no list keeps a replaced layer alive
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child, vnni))
            elif convs and _quantizable_conv(child):
                setattr(parent, name, Int8Conv2d(child, vnni))
            else:
                replace(child)

    replace(module)
    return module


def int8_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of `module` that hold int8 packed weights."""
    return [m for m in module.modules() if isinstance(m, _Int8Layer)]


def precision_of(net: nn.Module) -> str:
    """"int8" (layers quantized here), "compact" (16-bit weights, float32 compute: t2i.compact),
    "bf16" or "fp32": what `net` computes in (PNG metadata)."""
    if int8_layers(net):
        return "int8"
    if is_compact(net):
        return "compact"
    return "fp32" if next(net.parameters()).dtype == torch.float32 else "bf16"
