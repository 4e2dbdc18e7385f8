"""img2img, inpainting, outpainting and the SDXL refiner hand-off (issue 3) on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sd_oracles import OUTPUT_SCALE, build_sd1, build_sdxl

import t2i
from t2i.systems.base import GenerationRequest, UnsupportedOption, check_request
from t2i.systems.latent_diffusion import outpaint_canvas


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "sd1"
    build_sd1(folder)
    return t2i.load(folder)


def _picture(w: int = 32, h: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_img2img_strength_zero_returns_the_input(sd1):
    image = _picture()
    out = sd1.generate("a red circle", init_image=image, strength=0.0, steps=4, seed=1)
    expected = sd1.encode_image(image, 32, 32)
    torch.testing.assert_close(out.latents, expected)  # no step ran: the input's own latents
    assert out.images[0].tobytes() == sd1.decode(expected)[0].tobytes()  # = the VAE round trip
    assert out.images[0].size == (32, 32)  # img2img keeps the input's size


def test_img2img_strength_moves_away_from_the_input_gradually(sd1):
    image = _picture()
    base = sd1.encode_image(image, 32, 32)
    dist = [(sd1.generate("a red circle", init_image=image, strength=s, steps=10, seed=1, sampler="ddim").latents
             - base).norm().item() for s in (0.3, 1.0)]
    assert 0 < dist[0] < dist[1]


def test_inpainting_keeps_the_unmasked_region_and_changes_the_masked_one(sd1):
    image = _picture()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    out = sd1.generate("a red circle", init_image=image, mask=mask, steps=4, seed=2, sampler="euler")
    init = sd1.encode_image(image, 32, 32)
    right, left = (slice(None), slice(None), slice(None), slice(8, None)), (..., slice(0, 8))
    torch.testing.assert_close(out.latents[right], init[right], rtol=1e-5, atol=1e-5)
    assert (out.latents[left] - init[left]).abs().mean() > 0.1 * init.std()
    # In pixels the unmasked half is the input itself; the masked half is new.
    got = np.asarray(out.images[0]).astype(int)
    assert (got[:, 16:] == np.asarray(image)[:, 16:]).all()
    assert np.abs(got[:, :16] - np.asarray(image)[:, :16]).mean() > 10


def test_nine_channel_inpainting_unet_sees_mask_and_masked_image(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    ref = build_sd1(tmp_path / "base")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
    pipe = StableDiffusionInpaintPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                                          unet=unet, scheduler=ref.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    ours = t2i.load(tmp_path / "inpaint")
    image, mask = _picture(), Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    with pytest.raises(ValueError, match="inpainting model"):
        ours.generate("x", steps=1)
    with pytest.raises(UnsupportedOption, match="needs the option 'init_image'"):  # the server's 422
        check_request(ours, GenerationRequest("x"))
    with pytest.raises(UnsupportedOption, match="needs the option 'mask'"):
        check_request(ours, GenerationRequest("x", init_image=image))
    out = ours.generate("a red circle", init_image=image, mask=mask, steps=3, seed=0, sampler="ddim")
    # The masked image really reaches the network: another picture outside the hole changes the result.
    other = ours.generate("a red circle", init_image=_picture().rotate(90), mask=mask, steps=3, seed=0,
                          sampler="ddim")
    hole = (..., slice(5, 11), slice(5, 11))
    assert (out.latents[hole] - other.latents[hole]).abs().max() > 1e-3


def test_outpaint_canvas_pads_and_masks_the_padding():
    canvas, mask = outpaint_canvas(_picture(16, 16), left=8, top=0, right=0, bottom=8)
    assert canvas.size == mask.size == (24, 24)
    m = np.asarray(mask)
    assert m[:16, 8:].max() == 0 and m[:, :8].min() == 255 and m[16:].min() == 255
    assert np.asarray(canvas)[:16, 8:].tobytes() == np.asarray(_picture(16, 16)).tobytes()


def test_sdxl_refiner_hand_off_matches_diffusers(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = build_sdxl(tmp_path / "base")
    torch.manual_seed(2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 5 * 8)
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2,
                                               tokenizer=None, tokenizer_2=base.tokenizer_2, unet=unet,
                                               scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config),
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.save_pretrained(tmp_path / "refiner", safe_serialization=True)
    prompt, steps, g, seed = "a red circle", 6, 5.0, 4
    gen = torch.Generator("cpu").manual_seed(seed)
    handed = base(prompt, num_inference_steps=steps, guidance_scale=g, generator=gen, height=16, width=16,
                  denoising_end=0.7, output_type="latent").images
    expected = refiner(prompt, image=handed, num_inference_steps=steps, guidance_scale=g, denoising_start=0.7,
                       generator=gen, output_type="latent").images
    ours = t2i.load(tmp_path / "base").generate(prompt, seed=seed, steps=steps, guidance=g, sampler="euler",
                                                width=16, height=16, refiner=t2i.load(tmp_path / "refiner"),
                                                refiner_start=0.7)
    err = ((ours.latents - expected).abs().max() / expected.std()).item()
    assert err < 2e-4
    assert "Refiner: refiner" in ours.images[0].info["parameters"]


def test_bf16_precision_runs_close_to_fp32(tmp_path):
    build_sd1(tmp_path / "m")
    settings = dict(seed=1, steps=4, width=16, height=16, sampler="dpmpp_2m")
    fp32 = t2i.load(tmp_path / "m").generate("a red circle", **settings).latents
    bf16_pipe = t2i.load(tmp_path / "m", precision="bf16")
    assert next(bf16_pipe.unet.parameters()).dtype == torch.bfloat16
    bf16 = bf16_pipe.generate("a red circle", **settings).latents
    # bf16 rounding, amplified by the 8x output of a random U-Net, but the same picture
    assert ((bf16 - fp32).abs().max() / fp32.std()).item() < 0.5
    assert torch.corrcoef(torch.stack([bf16.flatten(), fp32.flatten()]))[0, 1] > 0.95
