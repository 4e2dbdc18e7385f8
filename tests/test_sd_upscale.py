"""The SD x4 upscaler family (`t2i.systems.sd_upscale`): a tiny random diffusers
`StableDiffusionUpscalePipeline`, saved by diffusers and loaded by t2i, gives diffusers' final latents and
decoded image from the same seed (issue 18), and the family's own doors (init image, base model, refusals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sd_oracles import DIFFUSERS_SCHEDULERS, _clip, _scale_output, _tokenizer

import t2i
from t2i.systems.sd_upscale import SDUpscalePipeline, detect, noise_low_res

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 2e-4  # max |ours - diffusers| relative to the std of diffusers' output
PROMPT, SEED, LOW = "a red circle above a blue square", 3, 16  # the low-res image is LOW x LOW


def build_upscaler(folder, seed: int = 0):
    """A tiny upscaler in diffusers: the x4 upscaler's layout (7 input channels, a level without attention,
    only-cross-attention on one level, the noise level as a class label, v-prediction DDIM, a DDPM
    low-res scheduler, VAE scaling 0.08333) at toy widths, output convolution scaled up."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=7, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=4, use_linear_projection=True,
                                only_cross_attention=(True, True, False), num_class_embeds=1000)
    _scale_output(unet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.08333)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type="v_prediction")
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=_clip(32, 2, "gelu", 2),
                                          tokenizer=_tokenizer(folder / "tokenizer", "!"), unet=unet,
                                          low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def low_res_image(size: int = LOW, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (values in the middle of the range)."""
    g = np.random.default_rng(seed)
    coarse = g.uniform(40, 215, (size // 4, size // 4, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscaler") / "model"
    reference = build_upscaler(folder)
    return folder, reference, t2i.load(folder)


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.std()).item()


@pytest.mark.parametrize(("sampler", "noise_level", "guidance", "negative"),
                         [("ddim", 20, 5.0, "blurry"), ("ddim", 150, 1.0, None), ("euler", 20, 5.0, None),
                          ("dpmpp_2m", 60, 3.0, None)])
def test_final_latents_and_image_match_diffusers(models, sampler, noise_level, guidance, negative):
    import diffusers

    _folder, reference, ours = models
    cls_name, extra = DIFFUSERS_SCHEDULERS[(sampler, False)]
    reference.scheduler = getattr(diffusers, cls_name).from_config(reference.scheduler.config, **extra)
    settings = dict(prompt=PROMPT, image=low_res_image(), num_inference_steps=4, guidance_scale=guidance,
                    noise_level=noise_level, negative_prompt=negative)
    expected = reference(**settings, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images
    expected_image = reference(**settings, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images

    result = ours.upscale(low_res_image(), PROMPT, negative or "", noise_level=noise_level, seed=SEED, steps=4,
                          guidance=guidance, sampler=sampler)
    assert result.sample.shape == (1, 4, LOW, LOW)
    assert _rel(result.sample, expected) < TOLERANCE, f"{sampler}: latents"
    ours_image = (ours.vae.decode(ours.vae.unscale(result.sample)) + 1) / 2  # (1, 3, 2 LOW, 2 LOW) in [0, 1]
    assert _rel(ours_image.clamp(0, 1), expected_image) < TOLERANCE, f"{sampler}: image"
    assert result.images[0].size == (2 * LOW, 2 * LOW)
    png = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    assert (png - expected_image[0]).abs().max() <= 1 / 255 + 1e-6  # the PNG is the image, rounded


def test_the_noise_level_and_the_low_res_image_steer_the_result(models):
    _folder, _reference, ours = models
    settings = dict(seed=SEED, steps=3, guidance=1.0)
    base = ours.upscale(low_res_image(), PROMPT, noise_level=20, **settings).sample
    other_level = ours.upscale(low_res_image(), PROMPT, noise_level=300, **settings).sample
    other_image = ours.upscale(low_res_image(seed=1), PROMPT, noise_level=20, **settings).sample
    assert _rel(other_level, base) > 1e-2 and _rel(other_image, base) > 1e-2
    with pytest.raises(ValueError, match="noise_level"):
        ours.upscale(low_res_image(), PROMPT, noise_level=351, **settings)


def test_noise_low_res_is_diffusers_add_noise():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    x, noise, level = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.tensor([20, 340])
    from t2i.systems.sd_upscale import LOW_RES_SCHEDULE

    got = noise_low_res(x, noise, level, LOW_RES_SCHEDULE.alphas_cumprod())
    assert torch.allclose(got, sched.add_noise(x, noise, level), atol=1e-6)


def test_request_api_and_a_base_model(models, tmp_path):
    folder, _reference, ours = models
    assert detect(folder) and isinstance(ours, SDUpscalePipeline) and ours.family == "sd_upscale"
    # The request form (CLI, server): init_image is the low-res image; the output is 2x (the VAE's factor).
    result = ours.generate(PROMPT, seed=1, steps=2, init_image=low_res_image(8))
    assert result.images[0].size == (16, 16) and "Noise level: 20" in result.images[0].info["parameters"]
    with pytest.raises(ValueError, match="low-res image"):
        ours.generate(PROMPT, seed=1, steps=2)
    # With a base model, a request without an image is a cascade: base at half the size, then this model.
    from t2i.systems.stable_diffusion import write_tiny

    base = t2i.load(write_tiny(tmp_path))
    cascade = ours.with_base(base)
    assert cascade.capabilities.native_size == (64, 64) and ours.base is None
    got = cascade.generate(PROMPT, seed=4, steps=2, width=32, height=32)
    low = base.generate(PROMPT, seed=4, width=16, height=16).images[0]
    alone = ours.generate(PROMPT, seed=4, steps=2, init_image=low)
    assert got.images[0].tobytes() == alone.images[0].tobytes()
    assert "Base model: tiny-sd" in got.images[0].info["parameters"]


def test_diffusers_reads_what_t2i_writes(tmp_path):
    """The family's own writer (write_tiny, and what `t2i train sd-upscale` exports) makes a folder diffusers
    loads, and both give the same latents."""
    from diffusers import StableDiffusionUpscalePipeline

    from t2i.systems.sd_upscale import write_tiny

    path = write_tiny(tmp_path)
    ours = t2i.load(path)
    reference = StableDiffusionUpscalePipeline.from_pretrained(path, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, image=low_res_image(), num_inference_steps=3, guidance_scale=4.0,
                         generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images
    got = ours.upscale(low_res_image(), PROMPT, seed=SEED, steps=3, guidance=4.0, sampler="ddim").sample
    assert _rel(got, expected) < TOLERANCE


def test_class_labels_go_with_a_class_embedding_only():
    from t2i.nets.unet import UNet
    from t2i.systems.sd_upscale import TINY_UNET
    from t2i.systems.stable_diffusion import TINY_UNET as PLAIN

    x, t, context = torch.randn(1, 7, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="class_labels"):
        UNet(TINY_UNET)(x, t, context)
    with pytest.raises(ValueError, match="class_labels"):
        UNet(PLAIN)(x[:, :4], t, context, class_labels=torch.tensor([3]))


# stabilityai/stable-diffusion-x4-upscaler unet/config.json, as published (abridged to the fields it carries)
X4_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 7, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": 1000, "only_cross_attention": [True, True, True, False], "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def test_the_full_size_x4_upscaler_unet_has_diffusers_parameters():
    """The published config builds (on the meta device) a U-Net with exactly diffusers' parameter names and shapes."""
    from diffusers import UNet2DConditionModel

    from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, unet_config_to_diffusers
    from t2i.nets.unet import UNet

    cfg = unet_config_from_diffusers(X4_UNET_JSON)
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(X4_UNET_JSON)
        ours = UNet(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.class_embedding.weight.shape == (1000, 1024)
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


def test_an_upscaler_alone_refuses_a_request_without_an_image_naming_it(models, tmp_path, capsys):
    """With no base model the upscaler needs the low-res image: a request without one is refused before any
    work, naming init_image: 422 from every server route (it was a 500 from the failed job), one line from
    the CLI, UnsupportedOption from check_request (and a ValueError naming the low-res image from run)."""
    pytest.importorskip("fastapi")
    from test_families import _post

    from t2i.cli import main
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import ServeConfig
    from t2i.systems.base import GenerationRequest, UnsupportedOption, check_request

    folder, _reference, ours = models
    assert ours.base is None
    with pytest.raises(UnsupportedOption, match="init_image") as refused:
        check_request(ours, GenerationRequest(PROMPT, seed=1))
    assert refused.value.option == "init_image"
    check_request(ours, GenerationRequest(PROMPT, seed=1, init_image=low_res_image(8)))
    with pytest.raises(ValueError, match="low-res image"):
        ours.generate(PROMPT, seed=1, steps=2)
    with BackgroundServer(create_app(ours, ServeConfig())) as server:
        for route, field in (("/v1/jobs", "init_image"), ("/sdapi/v1/txt2img", "init_images"),
                             ("/v1/images/generations", "init_image")):
            status, reply = _post(server.url + route, {"prompt": PROMPT})
            assert status == 422 and reply["error"]["param"] == field, (route, reply)
            assert "init_image" in reply["error"]["message"] and ours.name in reply["error"]["message"]
    capsys.readouterr()
    out = tmp_path / "no.png"
    assert main(["generate", PROMPT, "--model", str(folder), "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_image" in err[0] and not out.exists()


def test_a1111_img2img_reaches_an_upscaler_served_alone(models):
    """A1111's img2img always carries denoising_strength (0.75 when unset); an upscaler has no strength, so
    the route passes it on only when the client set it (then the model refuses it by name)."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from test_families import _post

    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import ServeConfig

    _folder, _reference, ours = models
    buf = io.BytesIO()
    low_res_image(8).save(buf, format="PNG")
    body = {"prompt": PROMPT, "init_images": [base64.b64encode(buf.getvalue()).decode()], "steps": 2}
    with BackgroundServer(create_app(ours, ServeConfig())) as server:
        status, reply = _post(server.url + "/sdapi/v1/img2img", body)
        assert status == 200 and len(reply["images"]) == 1, reply
        status, reply = _post(server.url + "/sdapi/v1/img2img", {**body, "denoising_strength": 0.5})
        assert status == 422 and reply["error"]["param"] == "denoising_strength", reply
