"""Sampler parity on a real (tiny, random) diffusers U-Net with classifier-free guidance.

diffusers' pipeline loop (CFG mixed on the batched U-Net output, optional guidance rescale,
scheduler.step) against t2i's plan + DiscreteDenoiser + CFGDenoiser from the same seed. The
U-Net's output convolution is scaled by 8 so that a wrong step or timestep cannot hide.
"""

from __future__ import annotations

import pytest
import torch
from test_samplers_parity import CLASSES, SD1, SD2, SEED

from t2i.checkpoints.diffusers_scheduler import scheduler_config_from_dict
from t2i.diffusion.guidance import CFGDenoiser
from t2i.samplers import prepare_sampling

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with torch.no_grad():  # a random tiny U-Net barely moves the latents; make mistakes visible
        unet.conv_out.weight.mul_(8.0)
        unet.conv_out.bias.mul_(8.0)
    return unet.eval()


SD2_TRAILING = dict(SD2, timestep_spacing="trailing")
CASES = [("ddim", False, 0.0, SD1), ("euler", False, 0.0, SD1), ("dpmpp_2m", True, 0.0, SD1),
         ("heun", False, 0.0, SD2_TRAILING), ("euler_a", False, 0.0, SD2_TRAILING),
         ("dpmpp_2m", False, 0.7, SD2_TRAILING)]


@pytest.mark.parametrize("sampler,karras,rescale,config", CASES,
                         ids=["ddim_sd1", "euler_sd1", "dpmpp_2m_karras_sd1", "heun_sd2", "euler_a_sd2",
                              "dpmpp_2m_rescale_sd2"])
def test_parity_with_a_tiny_unet_and_cfg(tiny_unet, sampler, karras, rescale, config):
    """The diffusers pipeline loop (CFG on the batched U-Net output, optional guidance rescale)
    against our plan + DiscreteDenoiser + CFGDenoiser, on a real (tiny, random) U-Net."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    steps, scale = 4, 7.5
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)

    cls = getattr(diffusers, CLASSES[sampler])
    extra = {"use_karras_sigmas": True} if karras else {}
    sched = cls.from_config(config, **extra)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(SEED)
    latents = torch.randn((1, 4, 8, 8), generator=gen) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            out = tiny_unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_u, out_c = out.chunk(2)
            guided = out_u + scale * (out_c - out_u)
            if rescale:
                guided = rescale_noise_cfg(guided, out_c, guidance_rescale=rescale)
            kwargs = {} if sampler == "heun" else {"generator": gen}
            latents = sched.step(guided, t, latents, **kwargs).prev_sample

    plan = prepare_sampling(scheduler_config_from_dict(config), sampler, steps, karras=karras)

    def net(x, t, encoder_hidden_states):
        return tiny_unet(x, t, encoder_hidden_states=encoder_hidden_states).sample

    den = CFGDenoiser(plan.denoiser(net), scale=scale, rescale=rescale)
    gen = torch.Generator().manual_seed(SEED)
    x = plan.start(torch.randn((1, 4, 8, 8), generator=gen))
    branches = {"cond": {"encoder_hidden_states": cond}, "uncond": {"encoder_hidden_states": uncond}}
    with torch.no_grad():
        ours = plan.finish(plan.run(den, x, extra_args=branches, generator=gen))
    err = ((ours - latents).abs().max() / latents.std()).item()
    # float32 floor: in diffusers itself, scaling the initial latents by (1 + 1e-7) moves the final
    # latents of this amplified U-Net with guidance 7.5 by 1.2e-5 to 1.7e-5 of their std. We see
    # 1e-5 to 3e-5 (guidance is mixed on x0, not on the network output), 2e-4 is issue 2's bar.
    assert err < 6e-5, err
