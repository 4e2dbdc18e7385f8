"""Parity of t2i's KL autoencoder with diffusers' AutoencoderKL on the same random weights
(diffusers is the test oracle only), plus the posterior's arithmetic and config translation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from t2i.autoencoders.kl import AUTOENCODER_KL_CONFIGS, AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from t2i.checkpoints.diffusers_nets import vae_config_from_diffusers, vae_config_to_diffusers

diffusers = pytest.importorskip("diffusers")
DiffusersAutoencoderKL = diffusers.AutoencoderKL

TOL = 1e-4  # max |ours - ref| / std(ref)


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.5,
}
CASES = {
    "sd_like": TINY,
    "no_attention_no_quant": {
        **TINY,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.1,
    },
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Norm affines away from (1, 0), larger encoder/decoder output convs, so mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        model.encoder.conv_out.weight.mul_(4.0)
        model.decoder.conv_out.weight.mul_(4.0)


def _pair(cfg: dict) -> tuple[torch.nn.Module, AutoencoderKL]:
    torch.manual_seed(3)
    ref = DiffusersAutoencoderKL(**copy.deepcopy(cfg)).eval()
    _randomize(ref, 3)
    ours = AutoencoderKL(vae_config_from_diffusers(copy.deepcopy(cfg))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.std()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_vae_matches_diffusers(case: str) -> None:
    ref, ours = _pair(CASES[case])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1  # non-square on purpose
    z = torch.randn(2, 4, 8, 6, generator=g)
    with torch.no_grad():
        want_post = ref.encode(x).latent_dist
        got_post = ours.encode(x)
        want_dec = ref.decode(z).sample
        got_dec = ours.decode(z)
        want_sample = want_post.sample(torch.Generator().manual_seed(5))
        got_sample = got_post.sample(torch.Generator().manual_seed(5))
    assert got_post.mean.shape == (2, 4, 8, 6) and got_dec.shape == (2, 3, 32, 24)
    errs = {
        "mean": _rel(got_post.mean, want_post.mean),
        "std": _rel(got_post.std, want_post.std),
        "sample": _rel(got_sample, want_sample),
        "kl": _rel(got_post.kl(), want_post.kl()),
        "decode": _rel(got_dec, want_dec),
    }
    print(case, " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert all(v < TOL for v in errs.values()), errs
    # The std is a real output here, not a clamp artefact.
    assert 0.05 < got_post.std.median().item() < 20


def test_latent_scaling_inverts() -> None:
    cfg = vae_config_from_diffusers(CASES["no_attention_no_quant"])
    vae = AutoencoderKL(cfg)
    z = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(vae.scale(z), (z - 0.1) * 0.5)
    torch.testing.assert_close(vae.unscale(vae.scale(z)), z)


def test_diagonal_gaussian_golden() -> None:
    """mean 0, logvar log(4) on 2 latent values: std 2, KL = 0.5 * 2 * (4 - 1 - log 4)."""
    moments = torch.cat([torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 2), math.log(4.0))], dim=1)
    post = DiagonalGaussian(moments)
    torch.testing.assert_close(post.std, torch.full((1, 1, 1, 2), 2.0))
    torch.testing.assert_close(post.kl(), torch.tensor([3.0 - math.log(4.0)]))
    eps = torch.randn((1, 1, 1, 2), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(9)), 2.0 * eps)
    # logvar is clamped to [-30, 20] as in the reference
    assert DiagonalGaussian(torch.tensor([0.0, 100.0]).reshape(1, 2, 1, 1)).logvar.item() == 20.0


def test_training_forward_backward() -> None:
    """The f = 4 training preset: 64x64 images -> 16x16x4 latents, gradients reach the encoder."""
    cfg = AUTOENCODER_KL_CONFIGS["tiny"]
    assert cfg.downsample_factor == 4 and AUTOENCODER_KL_CONFIGS["f4_64"].downsample_factor == 4
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    x_hat, post = vae(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and post.mean.shape == (2, 4, 16, 16)
    loss = (x_hat - x).abs().mean() + 1e-6 * post.kl().mean()
    loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None and vae.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case: str) -> None:
    cfg = CASES[case]
    ours = vae_config_from_diffusers(copy.deepcopy(cfg))
    back = vae_config_to_diffusers(ours)
    assert vae_config_from_diffusers(copy.deepcopy(back)) == ours
    a = DiffusersAutoencoderKL(**cfg).state_dict()
    b = DiffusersAutoencoderKL.from_config(back).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert DiffusersAutoencoderKL.from_config(back).config.scaling_factor == cfg["scaling_factor"]


@pytest.mark.parametrize("name", ["sd", "sdxl", "f4_64"])
def test_presets_have_diffusers_layout(name: str) -> None:
    cfg: AutoencoderKLConfig = AUTOENCODER_KL_CONFIGS[name]
    with torch.device("meta"):
        ref = DiffusersAutoencoderKL.from_config(vae_config_to_diffusers(cfg))
        ours = AutoencoderKL(cfg)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in ref.state_dict().items()} == shapes


@pytest.mark.parametrize(
    ("option", "value"),
    [("latents_mean", [0.0] * 4), ("act_fn", "gelu"), ("down_block_types", ["AttnDownEncoderBlock2D"] * 3)],
)
def test_unsupported_options_are_named(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        vae_config_from_diffusers({**TINY, option: value})


SD_VAE_JSON = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parametrize(
    ("config", "preset"),
    [
        (SD_VAE_JSON, "sd"),  # no scaling_factor field: diffusers' default 0.18215
        ({**SD_VAE_JSON, "scaling_factor": 0.13025, "sample_size": 1024, "force_upcast": True}, "sdxl"),
    ],
)
def test_published_configs_give_presets(config: dict, preset: str) -> None:
    assert vae_config_from_diffusers(copy.deepcopy(config)) == AUTOENCODER_KL_CONFIGS[preset]
