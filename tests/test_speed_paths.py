"""The CPU fast paths compute what the plain paths compute (issue 7); no timings are asserted.

- `nets.conv.Conv2d`: im2col + GEMM on small maps equals `nn.Conv2d`, and is really taken there.
- `Attention.fuse_projections` / `cache_context`: same outputs, a cache that misses when the
  context changes, training never on the fused copy, loading or casting keeps it consistent.
- Meta-device loading: the sinusoidal table is real; no random init runs there (it imported
  torch._dynamo, seconds of a load); the fast NaN/Inf check refuses like io's.
- precision "auto": bf16 only with native bf16 flags; int8 with float32 on AVX2 CPUs without them.
- bf16 U-Net: no further from diffusers' fp32 output than diffusers' own U-Net cast to bf16.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t2i
from t2i.checkpoints.io import CheckpointError, check_finite
from t2i.nets import resample
from t2i.nets.attention import Attention
from t2i.nets.conv import Conv2d
from t2i.nets.embeddings import SinusoidalEmbedding, sinusoidal_frequencies
from t2i.nets.resnet import ResBlock
from t2i.nets.unet import UNET_CONFIGS, UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().std()).item()


@pytest.mark.parametrize("c_in,c_out,size,stride,padding,bias", [
    (512, 24, 4, 1, 1, True), (456, 16, 8, 1, 1, False), (512, 12, 9, 2, 0, True), (520, 8, 7, 2, 1, True),
    (640, 20, 3, 1, 1, True)])
def test_small_map_conv_matches_nn_conv2d(monkeypatch, c_in, c_out, size, stride, padding, bias):
    torch.manual_seed(0)
    ref = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding, bias=bias)
    ours = Conv2d(c_in, c_out, 3, stride=stride, padding=padding, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, c_in, size, size)
    calls = []
    unfold = F.unfold
    monkeypatch.setattr(F, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert calls, "the im2col path was not taken on a small map"
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
    # With autograd on, the library convolution runs (bit-identical, and trainable).
    calls.clear()
    assert torch.equal(ours(x), ref(x)) and not calls


@pytest.mark.parametrize("c_in,size", [(512, 9), (32, 4)])
def test_large_map_or_narrow_conv_is_the_library_conv(c_in, size):
    """81 output pixels > SMALL_MAP, or 32 * 9 inputs < WIDE_INPUT: bit-identical to nn.Conv2d."""
    torch.manual_seed(0)
    ref = nn.Conv2d(c_in, 8, 3, padding=1)
    ours = Conv2d(c_in, 8, 3, padding=1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, c_in, size, size)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def _upsample_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The library's nearest 2x interpolation, then the 3x3 conv."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("shape,bias", [((2, 8, 16, 16), True), ((1, 6, 17, 23), False), ((1, 4, 1, 1), True)])
def test_nearest2x_conv3x3_is_upsample_then_conv(shape, bias):
    """The four-phase 2x2 convolutions give interpolate + 3x3 conv, borders included (odd sizes,
    a 1x1 map), in value and in gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 5, 3, padding=1, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    expected = _upsample_reference(x, conv.weight, conv.bias)
    got = resample.nearest2x_conv3x3(x, conv.weight, conv.bias)
    w64, b64 = conv.weight.double(), None if conv.bias is None else conv.bias.double()
    exact = resample.nearest2x_conv3x3(x.double(), w64, b64)
    exact_reference = _upsample_reference(x.double(), w64, b64)
    assert _rel(exact, exact_reference) < 1e-12  # the same function, not just close
    # float32: as close to the float64 result as the library's own interpolate + conv (both ~1e-6)
    assert got.shape == expected.shape and _rel(got, exact_reference) < 3e-6 and _rel(expected, exact_reference) < 3e-6
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, (x, conv.weight), g)
    grads_ours = torch.autograd.grad(got, (x, conv.weight), g)
    for a, b in zip(grads_ours, grads, strict=True):
        assert _rel(a, b) < 1e-5


def test_upsample_takes_the_phase_path_on_large_maps_only(monkeypatch):
    """Upsample agrees with interpolate + conv on both sides of PHASE_MIN_PIXELS, in fp32 and bf16,
    and the phase path is the one taken from PHASE_MIN_PIXELS input pixels on."""
    torch.manual_seed(0)
    up = resample.Upsample(16, 8)
    calls = []
    phase = resample.nearest2x_conv3x3
    monkeypatch.setattr(resample, "nearest2x_conv3x3", lambda *a: calls.append(a[0].shape) or phase(*a))
    side = math.isqrt(resample.Upsample.PHASE_MIN_PIXELS)
    for size in (side // 2, side):  # a quarter of PHASE_MIN_PIXELS: plain path; PHASE_MIN_PIXELS: phases
        x = torch.randn(2, 16, size, size)
        with torch.no_grad():
            assert _rel(up(x), _upsample_reference(x, up.conv.weight, up.conv.bias)) < 5e-6  # summation order
            # bf16: no further from the float32 result on the same bf16 values than the library's
            # bf16 interpolate + conv
            up16, x16 = resample.Upsample(16, 8).to(torch.bfloat16), x.bfloat16()
            up16.load_state_dict(up.state_dict())
            w16, b16 = up16.conv.weight, up16.conv.bias
            truth = _upsample_reference(x16.float(), w16.float(), b16.float())
            err, err_library = _rel(up16(x16), truth), _rel(_upsample_reference(x16, w16, b16), truth)
            assert err < 1.5 * err_library, (err, err_library)
    assert calls == [torch.Size([2, 16, side, side])] * 2


def test_resblock_inference_path_is_the_training_path():
    """Without autograd the ResBlock's activations and residual run in place: same output."""
    torch.manual_seed(0)
    for block in (ResBlock(16, 32, temb_dim=8, groups=4), ResBlock(16, temb_dim=8, groups=4,
                                                                                 scale_shift=True)):
        x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
        x_before, temb_before = x.clone(), temb.clone()
        with torch.enable_grad():
            expected = block(x, temb)
        with torch.inference_mode():
            got = block(x, temb)
        assert torch.equal(got, expected.detach())
        assert torch.equal(x, x_before) and torch.equal(temb, temb_before)  # the inputs are never written
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 convs + a float32 identity skip: promoted
            with torch.enable_grad():
                expected = block(x, temb)
            with torch.inference_mode():
                got = block(x, temb)
        assert got.dtype == expected.dtype and torch.equal(got, expected.detach())


def _attention_pair(cross: bool) -> tuple[Attention, Attention]:
    torch.manual_seed(0)
    a = Attention(32, 4, context_dim=24 if cross else None, qkv_bias=True)
    b = Attention(32, 4, context_dim=24 if cross else None, qkv_bias=True)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("cross", [False, True])
def test_fused_projections_same_output(cross):
    plain, fused = _attention_pair(cross)
    fused.fuse_projections()
    fused.cache_context = True
    x = torch.randn(2, 10, 32)
    ctx = torch.randn(2, 7, 24) if cross else None
    with torch.no_grad():
        expected = plain(x, ctx)
        first, second = fused(x, ctx), fused(x, None if ctx is None else ctx.clone())
    assert _rel(first, expected) < 1e-6 and torch.equal(first, second)
    assert set(fused.state_dict()) == set(plain.state_dict())  # reference names only
    if cross:
        assert fused._kv_cache is not None
        ctx2 = ctx + 0.5  # a new context must not be served from the cache
        with torch.no_grad():
            assert _rel(fused(x, ctx2), plain(x, ctx2)) < 1e-6
            assert _rel(fused(x, ctx2), plain(x, ctx)) > 1e-2


def test_fused_copy_never_used_for_training_and_follows_loads_and_casts():
    plain, fused = _attention_pair(cross=False)
    fused.fuse_projections()
    x = torch.randn(1, 5, 32)
    out = fused(x)  # autograd on: the separate, trainable projections
    out.sum().backward()
    assert fused.to_q.weight.grad is not None
    # New weights through load_state_dict drop the stale fused copy.
    torch.manual_seed(1)
    other = Attention(32, 4, qkv_bias=True)
    fused.load_state_dict(other.state_dict())
    assert fused.fused_weight is None
    fused.fuse_projections()
    fused.to(torch.float64)
    assert fused.fused_weight is not None and fused.fused_weight.dtype == torch.float64
    with torch.no_grad():
        assert _rel(fused(x.double()), other.double()(x.double())) < 1e-12


def test_unet_fuse_projections_same_output():
    torch.manual_seed(0)
    cfg = UNET_CONFIGS["tiny"]
    a, b = UNet(cfg).eval(), UNet(cfg).eval()
    b.load_state_dict(a.state_dict())
    b.fuse_projections()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, cfg.context_dim)
    with torch.no_grad():
        assert _rel(b(x, t, ctx), a(x, t, ctx)) < 1e-5
        assert _rel(b(x, t + 1, ctx), a(x, t + 1, ctx)) < 1e-5  # second step: cached K/V


def test_meta_built_embedding_has_its_table():
    with torch.device("meta"):
        emb = SinusoidalEmbedding(320)
    assert emb.freqs.device.type == "cpu"
    assert torch.equal(emb.freqs, sinusoidal_frequencies(320))
    assert emb.freqs[1].item() == pytest.approx(10000 ** (-1 / 160), rel=1e-6)


def test_meta_building_draws_nothing_and_imports_no_dynamo():
    # a fresh process: the test session itself may have imported torch._dynamo already
    code = (
        "import sys, torch\n"
        "from t2i.checkpoints.io import on_meta_device\n"
        "from t2i.text.clip import CLIPTextConfig, CLIPTextModel\n"
        "with on_meta_device():\n"
        "    e = torch.nn.Embedding(10, 4); w = torch.empty(3).normal_(); torch.nn.init.normal_(w, std=2.0)\n"
        "    clip = CLIPTextModel(CLIPTextConfig())  # SD 1.x's tower: its embeddings are what imported dynamo\n"
        "assert all(p.is_meta for p in clip.parameters())\n"
        "assert e.weight.is_meta and w.is_meta\n"
        "assert 'torch._dynamo' not in sys.modules, 'meta init imported torch._dynamo'\n"
        "torch.manual_seed(0); real = torch.nn.Embedding(1000, 8)  # outside: the usual N(0, 1) init\n"
        "assert abs(real.weight.std().item() - 1) < 0.05\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_fast_finite_check(tmp_path):
    ok = {"w": torch.randn(10), "huge": torch.full((4,), 3e38)}  # finite, but the sum overflows
    check_finite(ok, tmp_path / "ok.safetensors")
    for bad_value in (float("nan"), float("inf")):
        bad = {"w": torch.randn(10), "b": torch.tensor([1.0, bad_value])}
        with pytest.raises(CheckpointError, match="'b' contains NaN or Inf"):
            check_finite(bad, tmp_path / "bad.safetensors")


def test_precision_auto(monkeypatch):
    zen3 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma f16c\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    spr = "flags\t\t: avx512f amx_bf16 amx_tile\n"
    assert not t2i.native_bf16(zen3)
    assert t2i.native_bf16(zen4) and t2i.native_bf16(spr)
    monkeypatch.setattr(t2i, "native_bf16", lambda cpuinfo=None: False)
    monkeypatch.setattr(t2i, "has_vnni", lambda cpuinfo=None: False)
    monkeypatch.setattr(t2i, "has_int8_kernels", lambda cpuinfo=None: False)
    monkeypatch.setattr(t2i, "model_bytes", lambda model=None: 2_000_000_000)  # an SD-sized model
    assert t2i.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(t2i, "has_int8_kernels", lambda cpuinfo=None: True)  # AVX2, no bf16: int8 + fp32
    assert t2i.resolve_precision("auto") == "int8"
    monkeypatch.setattr(t2i, "native_bf16", lambda cpuinfo=None: True)
    assert t2i.resolve_precision("auto") == "bf16"
    assert t2i.resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError):
        t2i.resolve_precision("fp16")


def test_bf16_unet_within_the_diffusers_bf16_yardstick():
    diffusers = pytest.importorskip("diffusers")
    from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers

    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2,
                  cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet(unet_config_from_diffusers(ref.config)).eval()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 20.0]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        exact = ref(x, t, encoder_hidden_states=ctx).sample
        yard = ref.to(torch.bfloat16)(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16()).sample
        got = ours.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    yardstick, err = _rel(yard, exact), _rel(got, exact)
    assert 1e-3 < yardstick < 0.2  # bf16 rounding is visible, and the reference is sane
    assert err <= 1.25 * yardstick, (err, yardstick)


def test_compiled_unet_generates_what_the_eager_one_does(tmp_path):
    """`t2i generate --compile`: the U-Net runs through torch.compile (frozen weights) and the final
    latents stay within float32 rounding of the eager run's."""
    from sd_oracles import build_sd1

    from t2i.cli import main

    folder = tmp_path / "sd1"
    build_sd1(folder)
    job = ["generate", "a red circle", "--model", str(folder), "--steps", "3", "--width", "32", "--height", "32",
           "--seed", "2", "--precision", "fp32", "--quiet"]
    assert main([*job, "--out", str(tmp_path / "eager.png"),
                 "--save-latents", str(tmp_path / "eager.safetensors")]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main([*job, "--compile", "--out", str(tmp_path / "compiled.png"),
                 "--save-latents", str(tmp_path / "compiled.safetensors")]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled U-Net really ran
    from safetensors.torch import load_file

    eager, compiled = (load_file(tmp_path / f"{n}.safetensors")["latents"] for n in ("eager", "compiled"))
    assert _rel(compiled, eager) < 2e-4
    # Frozen: the weights are constants of the compiled graph (what makes it faster on CPU), so a
    # change to them reaches the eager U-Net but not the compiled one until compile() is called again.
    pipe = t2i.load(folder, precision="fp32")
    pipe.compile()
    assert pipe._sampling_net() is not pipe.unet and pipe._sampling_net(deepcache=2).unet is pipe.unet
    settings = dict(steps=2, width=32, height=32, seed=2)
    before = pipe.generate("a red circle", **settings).latents
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(1.0)
    assert torch.equal(pipe.generate("a red circle", **settings).latents, before)
    pipe._compiled_unet = None
    assert not torch.allclose(pipe.generate("a red circle", **settings).latents, before)


def test_release_freed_memory_trims_the_glibc_heap_before_the_decode(monkeypatch):
    """Where the C library is glibc, `malloc_trim` is found and called (before each VAE decode)."""
    import platform

    from t2i.systems import latent_diffusion

    assert latent_diffusion.release_freed_memory() is (platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(latent_diffusion, "release_freed_memory", lambda: calls.append(1) or True)
    t2i.load().generate("a red circle", steps=2)
    assert calls == [1]
