"""precision="int8": the U-Net's Linear layers really are int8, images stay close to fp32, and
`auto` picks by CPU flags (t2i.auto_precision, t2i.quantize)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import t2i
from t2i.quantize import Int8Linear, int8_linears, quantize_linears

pytestmark = pytest.mark.usefixtures("one_thread")

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma f16c\n"
SKYLAKE_SP = "flags\t\t: avx2 avx512f avx512dq avx512bw avx512vl\n"
CASCADE_LAKE = "flags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
ALDER_LAKE = "flags\t\t: avx2 avx_vnni\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile\n"
BF16_ONLY = "flags\t\t: avx512f avx512_bf16\n"  # no such CPU is sold; the rule still says what it gets


@pytest.mark.parametrize("cpuinfo, expected", [
    (ZEN3, "fp32"), (SKYLAKE_SP, "fp32"), (CASCADE_LAKE, "fp32"), (ALDER_LAKE, "fp32"), ("", "fp32"),
    (ZEN4, "int8"), (SAPPHIRE_RAPIDS, "int8"), (BF16_ONLY, "bf16"),
])
def test_auto_precision_by_cpu_flags(cpuinfo, expected):
    assert t2i.auto_precision(cpuinfo) == expected


def test_resolve_precision_keeps_int8_and_asks_the_cpu_for_auto():
    assert t2i.resolve_precision("int8") == "int8"
    assert t2i.resolve_precision("auto") == t2i.auto_precision(model_bytes=t2i.model_bytes(None)) == "fp32"
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


def test_int8_unet_linears_are_packed_int8(tiny_sd):
    pipe = tiny_sd["int8"]
    n_linear = sum(type(m) is nn.Linear for m in tiny_sd["fp32"].unet.modules())
    layers = int8_linears(pipe.unet)
    assert n_linear > 0 and len(layers) == n_linear
    assert not any(type(m) is nn.Linear for m in pipe.unet.modules())
    assert any(type(m) is nn.Linear for m in pipe.text_encoder.modules())  # stays float (t2i.quantize)
    for layer in layers:
        w = layer.weight()  # unpacked from the packed int8 GEMM weights
        assert w.dtype == torch.qint8
        assert w.q_per_channel_scales().shape == (layer.out_features,)  # one scale per output channel
        assert int(w.q_per_channel_zero_points().abs().max()) == 0  # symmetric
        assert layer.full_range == t2i.has_vnni()


def test_int8_generate_stays_close_to_fp32(tiny_sd):
    prompts = ["a photo of a cat", "a red circle"]
    ref, out = (tiny_sd[p](prompts, seed=0, steps=4) for p in ("fp32", "int8"))
    psnr = [_psnr(a, b) for a, b in zip(out, ref, strict=True)]
    # measured on Zen 4 (int8 Linears, the rest bf16): 36.0 and 36.6 dB
    assert min(psnr) > 32, psnr
    assert max(psnr) < 80, psnr  # int8 did change something


def test_full_range_activations_halve_the_error():
    if not t2i.has_vnni():
        pytest.skip("8-bit activations are for CPUs with VNNI")
    torch.manual_seed(0)
    layer, x = nn.Linear(1280, 1280), torch.randn(512, 1280)
    with torch.no_grad():
        ref = layer(x)
    err = {}
    for vnni in (True, False):
        q = quantize_linears(nn.Sequential(copy.deepcopy(layer)), vnni=vnni)
        assert isinstance(q[0], Int8Linear) and q[0].full_range == vnni
        err[vnni] = float((q(x) - ref).norm() / ref.norm())
    # measured on Zen 4: 1.2e-2 with 8-bit activations, 2.3e-2 with PyTorch's 7-bit default
    assert err[True] < 0.016 and err[True] < 0.7 * err[False], err


def test_a_lora_is_refused_on_an_int8_unet_and_auto_keeps_the_model_float_for_one(tmp_path, monkeypatch):
    """LoRAs merge into float weights: an int8 U-Net refuses them by name, and `auto` picks bf16 over int8
    for a model that LoRAs will be merged into."""
    from t2i.adapters.lora import LoraError, apply_loras
    from t2i.quantize import quantize_linears
    from t2i.systems.shapes_ldm import write_tiny_model

    pipe = t2i.load(write_tiny_model(tmp_path / "m"))
    quantize_linears(pipe.unet, t2i.has_vnni())
    assert pipe.precision == "int8"
    with pytest.raises(LoraError, match="int8"):
        apply_loras(pipe, [(tmp_path / "any.safetensors", 1.0)])
    monkeypatch.setattr(t2i, "auto_precision", lambda **kw: "bf16" if kw["quantizable"] is False else "int8")
    assert t2i.resolve_precision("auto", None, quantizable=False) == "bf16"
