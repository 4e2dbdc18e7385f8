"""DeepCache (t2i.nets.unet.DeepCacheUNet): full passes are the plain U-Net, cached passes skip
the deep levels and, on an unchanged input, reproduce the full pass; the pipeline option runs
and records itself in the PNG metadata."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sd_oracles import build_sd1

import t2i
from t2i.nets.unet import UNET_CONFIGS, DeepCacheUNet, UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet() -> UNet:
    torch.manual_seed(0)
    cfg = dataclasses.replace(UNET_CONFIGS["tiny"], block_channels=(32, 64, 64), layers_per_block=(2, 2, 2),
                              attention=(True, True, False), num_heads=(2, 2, 2), transformer_depth=(1, 1, 1),
                              only_cross_attention=(False, False, False))
    unet = UNet(cfg).eval()
    for p in unet.parameters():  # random, not zero-initialised outputs, so every block matters
        p.data.normal_(0, 0.05)
    return unet


def _inputs(seed: int, unet: UNet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, 7, unet.cfg.context_dim, generator=g)
    return x, t, ctx


@torch.no_grad()
def test_full_pass_is_the_plain_unet_and_a_cached_pass_on_the_same_input_reproduces_it():
    unet = _unet()
    x, t, ctx = _inputs(0, unet)
    cached = DeepCacheUNet(unet, interval=3)
    full = cached(x, t, ctx)
    assert torch.equal(full, unet(x, t, ctx))
    again = cached(x, t, ctx)  # call 1: first level only, on the stored deep features
    torch.testing.assert_close(again, full, rtol=0, atol=1e-6)
    x2, t2, ctx2 = _inputs(1, unet)
    moved = cached(x2, t2, ctx2)  # call 2: cached, so not the full result on the new input
    assert (moved - unet(x2, t2, ctx2)).abs().max() > 1e-3
    assert torch.equal(cached(x2, t2, ctx2), unet(x2, t2, ctx2))  # call 3: full again


@torch.no_grad()
def test_cached_calls_skip_the_deep_levels():
    unet = _unet()
    runs = {"mid": 0, "deep_down": 0, "last_up": 0}
    unet.mid_block.register_forward_hook(lambda *a: runs.__setitem__("mid", runs["mid"] + 1))
    unet.down_blocks[1].register_forward_hook(lambda *a: runs.__setitem__("deep_down", runs["deep_down"] + 1))
    unet.up_blocks[-1].register_forward_hook(lambda *a: runs.__setitem__("last_up", runs["last_up"] + 1))
    cached = DeepCacheUNet(unet, interval=3)
    x, t, ctx = _inputs(0, unet)
    for _ in range(7):
        cached(x, t, ctx)
    assert runs == {"mid": 3, "deep_down": 3, "last_up": 7}  # calls 0, 3, 6 in full


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError, match="interval must be at least 1"):
        DeepCacheUNet(_unet(), 0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    build_sd1(folder)
    return t2i.load(folder)


def test_pipeline_deepcache_changes_little_and_is_recorded(pipe):
    settings = dict(seed=3, steps=6, guidance=3.0, sampler="dpmpp_2m", width=32, height=32)
    plain = pipe.generate("a red circle", **settings)
    fast = pipe.generate("a red circle", deepcache=2, **settings)
    assert fast.images[0].info["parameters"].endswith("Deepcache interval: 2")
    assert "Deepcache" not in plain.images[0].info["parameters"]
    diff = (fast.latents - plain.latents).abs().max().item()
    assert 0 < diff < 0.5 * plain.latents.abs().max().item()
    with pytest.raises(ValueError, match="deepcache must be at least 1"):
        pipe.generate("a red circle", deepcache=0, **settings)
