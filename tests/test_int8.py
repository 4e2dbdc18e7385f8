"""precision="int8": the U-Net's Linear layers really are int8, images stay close to fp32, and
`auto` picks by CPU flags (t2i.auto_precision, t2i.quantize)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import t2i
from t2i.quantize import Int8Conv2d, Int8Linear, int8_layers, quantize_, quantize_activations, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma f16c\n"
SKYLAKE_SP = "flags\t\t: avx2 avx512f avx512dq avx512bw avx512vl\n"
CASCADE_LAKE = "flags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
ALDER_LAKE = "flags\t\t: avx2 avx_vnni\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile\n"
BF16_ONLY = "flags\t\t: avx512f avx512_bf16\n"  # no such CPU is sold; the rule still says what it gets
OLD_X86 = "flags\t\t: fpu sse sse2 sse4_2 avx\n"  # no AVX2: no vectorised int8 kernels


@pytest.mark.parametrize("cpuinfo, expected", [
    (ZEN3, "int8"), (SKYLAKE_SP, "int8"), (CASCADE_LAKE, "int8"), (ALDER_LAKE, "int8"), ("", "fp32"),
    (OLD_X86, "fp32"), (ZEN4, "int8"), (SAPPHIRE_RAPIDS, "int8"), (BF16_ONLY, "bf16"),
])
def test_auto_precision_by_cpu_flags(cpuinfo, expected):
    assert t2i.auto_precision(cpuinfo) == expected
    # a model LoRAs merge into stays float: bf16 where native, else fp32
    assert t2i.auto_precision(cpuinfo, quantizable=False) == ("bf16" if t2i.native_bf16(cpuinfo) else "fp32")


def test_cpu_description_names_the_first_processor_and_the_flags_that_pick_precision():
    two_processors = ("processor\t: 0\nmodel name\t: AMD Ryzen 9 7950X\ncpu family\t: 25\nmodel\t\t: 97\n"
                      "stepping\t: 2\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\n"
                      "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")
    assert t2i.cpu_description(two_processors) == ("AMD Ryzen 9 7950X (family 25 model 97 stepping 2), "
                                                    "flags avx2 avx512_bf16 avx512_vnni avx512f")
    assert t2i.cpu_description(OLD_X86) == "unknown CPU (family ? model ? stepping ?), flags none"


def test_resolve_precision_keeps_int8_and_asks_the_cpu_for_auto():
    assert t2i.resolve_precision("int8") == "int8"
    assert t2i.resolve_precision("auto") == t2i.auto_precision(model_bytes=t2i.model_bytes(None)) == "fp32"
    assert t2i.auto_precision(ZEN3, model_bytes=21_678_452) == "fp32"
    assert t2i.auto_precision(ZEN4, model_bytes=21_678_452) == "fp32"  # the built-in model: too small to gain
    assert t2i.auto_precision(ZEN4, model_bytes=2_000_000_000) == "int8"
    assert t2i.auto_precision(ZEN4, model_bytes=2_000_000_000, quantizable=False) == "bf16"  # LoRAs merge into it
    assert t2i.has_vnni(CASCADE_LAKE) and t2i.has_vnni(ALDER_LAKE) and not t2i.has_vnni(SKYLAKE_SP)


def _psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> dict:
    """A tiny random SD 1.x loaded in fp32 and in int8. A random tiny U-Net barely moves the
    latents; 8x its output makes its int8 error visible in the image (DESIGN.md, facts measured)."""
    from t2i.systems.stable_diffusion import write_tiny

    path = write_tiny(tmp_path_factory.mktemp("int8"))
    pipes = {p: t2i.load(path, precision=p) for p in ("fp32", "int8")}
    for pipe in pipes.values():
        pipe.unet.conv_out.weight.data.mul_(8), pipe.unet.conv_out.bias.data.mul_(8)
    return pipes


def test_int8_unet_linears_and_convolutions_are_packed_int8(tiny_sd):
    fp32, pipe = tiny_sd["fp32"].unet, tiny_sd["int8"].unet
    n_linear = sum(type(m) is nn.Linear for m in fp32.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and min(m.in_channels, m.out_channels) >= 32
                 for m in fp32.modules())
    layers = int8_layers(pipe)
    linears, convs = [m for m in layers if isinstance(m, Int8Linear)], [m for m in layers if isinstance(m, Int8Conv2d)]
    assert n_linear > 0 and len(linears) == n_linear and not any(type(m) is nn.Linear for m in pipe.modules())
    assert len(convs) == n_conv > 0  # the k x k convolutions at least 32 channels wide (t2i.quantize)
    assert isinstance(pipe.conv_in, nn.Conv2d) and isinstance(pipe.conv_out, nn.Conv2d)  # 4 channels: float
    assert any(type(m) is nn.Linear for m in tiny_sd["int8"].text_encoder.modules())  # stays float (t2i.quantize)
    for layer in layers:
        w = layer.int8_weight()  # unpacked from the packed oneDNN weights
        top = 127 if t2i.has_vnni() else 63  # without VNNI, 7 bits: int16 pair sums must not saturate
        assert w.dtype == torch.int8 and int(w.abs().max()) == top  # symmetric, each channel's max at the top
        assert layer.weight_scale.shape == (w.shape[0],)  # one scale per output channel
        assert layer.vnni == t2i.has_vnni()


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_layers_compute_exactly_the_dequantized_product(vnni):
    """Int8Linear / Int8Conv2d equal float32 layers on the dequantized weights and inputs (integer
    products summed exactly: in int32 with VNNI, in int16 pairs without, which 7-bit weights keep from
    saturating): the quantization is all the error there is."""
    if vnni and not t2i.has_vnni():
        pytest.skip("8-bit weights saturate oneDNN's int16 pair sums on a CPU without VNNI")
    torch.manual_seed(0)
    linear, conv = nn.Linear(96, 64), nn.Conv2d(48, 40, 3, stride=2, padding=1)
    x_lin, x_conv = torch.randn(5, 7, 96), torch.randn(2, 48, 9, 11) * 3 + 1
    for layer, x, make, f in ((linear, x_lin, Int8Linear, torch.nn.functional.linear),
                              (conv, x_conv, Int8Conv2d, lambda a, w, b: torch.nn.functional.conv2d(a, w, b, 2, 1))):
        q_layer = make(layer, vnni)
        qw, ws = quantize_weight(layer.weight, 127 if vnni else 63)
        assert torch.equal(q_layer.int8_weight(), qw) and int(qw.abs().max()) == (127 if vnni else 63)
        qx, xs, zp = quantize_activations(x)
        assert int(qx.max()) == 255 and (qx.int() - zp).abs().float().mean() > 20  # all 8 bits used
        w_deq = qw.float() * ws.view(-1, *[1] * (qw.dim() - 1))
        ref = f((qx.float() - zp) * xs, w_deq, layer.bias.detach())
        with torch.no_grad():
            out, out_bf16, plain = q_layer(x), q_layer(x.bfloat16()), layer(x)
        assert out.shape == ref.shape and out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        assert float((out - plain).norm() / plain.norm()) < (0.02 if vnni else 0.03)


def test_activations_quantize_in_float32_whatever_their_dtype_and_layout():
    torch.manual_seed(0)
    x = (torch.randn(4, 320, 9, 9) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    q, scale, zero_point = quantize_activations(x)
    q32, scale32, zp32 = quantize_activations(x.float().contiguous())
    assert torch.equal(q, q32) and (scale, zero_point) == (scale32, zp32)  # bf16 never rounds the codes
    assert q.is_contiguous(memory_format=torch.channels_last)  # what the int8 convolutions hand on
    ref = (x.float() / scale + zero_point).round().clamp(0, 255)
    assert (q.float() - ref).abs().max() <= 1 and float((q.float() != ref).float().mean()) < 1e-3  # ties only


def test_quantize_keeps_1x1_and_4_channel_convolutions_float_and_int8_upsamplers_run_plain():
    from t2i.nets.resample import Upsample

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), Upsample(64), nn.Conv2d(64, 64, 3, padding=1),
                        nn.Conv2d(64, 64, 1), nn.Conv2d(64, 4, 3, padding=1))
    x = torch.randn(1, 4, 32, 32)  # 1024 input pixels: the upsampler's fused float path, while float
    with torch.no_grad():
        ref = net(x)
        quantize_(net, vnni=t2i.has_vnni())
        out = net(x)
    assert [type(m).__name__ for m in net] == ["Conv2d", "Upsample", "Int8Conv2d", "Conv2d", "Conv2d"]
    assert type(net[1].conv).__name__ == "Int8Conv2d"  # upsample, then the int8 conv
    assert out.shape == ref.shape == (1, 4, 64, 64) and float((out - ref).norm() / ref.norm()) < 0.05


def test_int8_generate_stays_close_to_fp32(tiny_sd):
    prompts = ["a photo of a cat", "a red circle"]
    ref, out = (tiny_sd[p](prompts, seed=0, steps=4) for p in ("fp32", "int8"))
    psnr = [_psnr(a, b) for a, b in zip(out, ref, strict=True)]
    # measured on Zen 4, the rest bf16: int8 Linears only 36.0 and 36.6 dB; with the int8 3x3
    # convolutions too (session 14) 31.7 and 32.5 dB
    assert min(psnr) > 30, psnr
    assert max(psnr) < 80, psnr  # int8 did change something


def test_without_vnni_int8_weights_keep_7_bits_and_never_saturate():
    """On a CPU without VNNI oneDNN sums pairs of u8 x s8 products in int16: with 8-bit weights a layer
    of ones on inputs at the top of their range comes out halved (measured on a Zen 3: 32.4 for 64).
    quantize_ gives such CPUs 7-bit weights, which cannot saturate, and keeps 8-bit activations,
    which lose more than the weights' bit (Zen 3: 1.4e-2 against 2.3e-2 with 7-bit activations)."""
    ones = nn.Linear(64, 8, bias=False)
    nn.init.ones_(ones.weight)
    x = torch.ones(2, 64)
    with torch.no_grad():
        out = quantize_(nn.Sequential(copy.deepcopy(ones)), vnni=t2i.has_vnni())(x)
    assert torch.allclose(out, torch.full_like(out, 64.0), rtol=1e-3), out[0]
    torch.manual_seed(0)
    layer, x = nn.Linear(1280, 1280), torch.randn(512, 1280)
    with torch.no_grad():
        ref = layer(x)
        q = quantize_(nn.Sequential(copy.deepcopy(layer)), vnni=False)
        err = float((q(x) - ref).norm() / ref.norm())
    assert isinstance(q[0], Int8Linear) and not q[0].vnni
    assert 0.005 < err < 0.018, err  # 7-bit weights: 1.4e-2 on the Zen 3; with VNNI and 8 bits 1.2e-2


def test_a_lora_is_refused_on_an_int8_unet_and_auto_keeps_the_model_float_for_one(tmp_path, monkeypatch):
    """LoRAs merge into float weights: an int8 U-Net refuses them by name, and `auto` picks bf16 over int8
    for a model that LoRAs will be merged into."""
    from t2i.adapters.lora import LoraError, apply_loras
    from t2i.systems.shapes_ldm import write_tiny_model

    pipe = t2i.load(write_tiny_model(tmp_path / "m"))
    quantize_(pipe.unet, t2i.has_vnni())
    assert pipe.precision == "int8"
    with pytest.raises(LoraError, match="int8"):
        apply_loras(pipe, [(tmp_path / "any.safetensors", 1.0)])
    monkeypatch.setattr(t2i, "auto_precision", lambda **kw: "bf16" if kw["quantizable"] is False else "int8")
    assert t2i.resolve_precision("auto", None, quantizable=False) == "bf16"


def test_compile_refuses_an_int8_unet_and_auto_stays_float_with_compile(tiny_sd):
    """torch.compile fails on the int8 layers' oneDNN calls: the pipeline says so by name, and the CLI's
    `auto` does not pick int8 when --compile is given (nor when LoRAs merge)."""
    import argparse

    from t2i.generate_cli import _quantizable

    with pytest.raises(ValueError, match="int8.*bf16"):
        tiny_sd["int8"].compile()
    flags = dict(lora=None, lora_dir=None, compile=False)
    assert _quantizable(argparse.Namespace(**flags))
    assert not _quantizable(argparse.Namespace(**{**flags, "compile": True}))
    assert not _quantizable(argparse.Namespace(**{**flags, "lora": ["x.safetensors"]}))


def test_non_finite_inputs_are_refused_by_name():
    layer = Int8Linear(nn.Linear(4, 3), vnni=t2i.has_vnni())
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))
