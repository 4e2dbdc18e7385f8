"""Shared blocks on their own: golden values and parity with the diffusers layers they mirror."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.nets.embeddings import SinusoidalEmbedding, timestep_embedding
from t2i.nets.resample import Downsample, Upsample
from t2i.nets.resnet import ResBlock
from t2i.nets.spatial_attention import SpatialTransformer

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_timestep_embedding_golden() -> None:
    """dim 4, shift 0: freqs 1 and 10000 ** (-1/2) = 0.01; cos first when flipped."""
    t = torch.tensor([0.0, 50.0])
    emb = timestep_embedding(t, 4, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    want = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [math.cos(50.0), math.cos(0.5), math.sin(50.0), math.sin(0.5)]]
    )
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dim", "flip", "shift"), [(32, True, 0), (33, True, 0), (16, False, 1)])
def test_timestep_embedding_matches_diffusers(dim: int, flip: bool, shift: float) -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.25, 999.0])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(timestep_embedding(t, dim, flip, shift), want, rtol=0, atol=0)
    # The module form precomputes the table once and gives the same numbers, even after a cast.
    module = SinusoidalEmbedding(dim, flip, shift).to(torch.bfloat16)
    torch.testing.assert_close(module(t), want, rtol=0, atol=0)
    assert not list(module.state_dict())


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_diffusers(scale_shift: bool) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ref = ResnetBlock2D(
        in_channels=8,
        out_channels=16,
        temb_channels=12,
        groups=4,
        eps=1e-5,
        time_embedding_norm="scale_shift" if scale_shift else "default",
    ).eval()
    ours = ResBlock(8, 16, 12, groups=4, eps=1e-5, scale_shift=scale_shift).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, temb = torch.randn(2, 8, 6, 5), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, temb), ref(x, temb), rtol=1e-5, atol=1e-5)


def test_resblock_3x3_shortcut_and_no_temb() -> None:
    torch.manual_seed(0)
    block = ResBlock(4, 6, None, groups=2, shortcut_kernel=3).eval()
    assert block.time_emb_proj is None and block.conv_shortcut.kernel_size == (3, 3)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        # Zero the residual branch: the output is exactly the shortcut conv.
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
        torch.testing.assert_close(block(x), block.conv_shortcut(x))


def test_down_and_upsample_shapes() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = Downsample(1, use_conv=False)(x)
    torch.testing.assert_close(pooled, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert Downsample(3, padding=0)(torch.zeros(1, 3, 7, 9)).shape == (1, 3, 3, 4)  # right/bottom pad
    assert Downsample(3, padding=1)(torch.zeros(1, 3, 7, 9)).shape == (1, 3, 4, 5)
    up = Upsample(1, use_conv=False)
    want = torch.tensor([[[[1.0, 1.0, 2.0, 2.0]] * 2]])
    torch.testing.assert_close(up(torch.tensor([[[[1.0, 2.0]]]])), want)
    assert up(torch.zeros(1, 1, 3, 4), size=(5, 7)).shape == (1, 1, 5, 7)


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_matches_diffusers(linear: bool) -> None:
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    # 3 heads of 10 on 32 channels: the inner width differs from the channel count.
    ref = Transformer2DModel(
        3,
        10,
        in_channels=32,
        num_layers=2,
        cross_attention_dim=12,
        norm_num_groups=8,
        use_linear_projection=linear,
    ).eval()
    ours = SpatialTransformer(32, 3, 10, 12, depth=2, linear_projection=linear, groups=8).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 32, 4, 3), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(ours(x, ctx), want, rtol=1e-5, atol=1e-5)
