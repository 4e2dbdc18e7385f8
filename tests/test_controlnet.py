"""ControlNet for Stable Diffusion (issue 20): diffusers' ControlNetModel folders load into t2i's ControlNet,
its residuals match diffusers', and generation with a control image lands on the final latents of
`StableDiffusionControlNetPipeline` from the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_oracles import build_sd1

import t2i
from t2i.checkpoints.diffusers_controlnet import load_controlnet
from t2i.checkpoints.io import CheckpointError
from t2i.nets.controlnet import ControlNet
from t2i.nets.unet import UNET_CONFIGS, UNet
from t2i.systems.base import GenerationRequest

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 2e-4  # max |ours - diffusers| relative to the std of diffusers' final latents
SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8x8
EMBEDDING = (8, 16)  # one stride-2 step: the conditioning embedding reaches latent size (factor 2)


def _perturbed_controlnet(unet, seed: int = 1):
    """ControlNetModel.from_unet(unet) with its zero convolutions (and the embedding's zero output conv)
    set to random values, scaled up so a wrong residual or a wrong skip it is added to cannot hide."""
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING)
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.5)
            conv.bias.normal_(0.0, 0.5)
    return net.eval()


def _control_image(seed: int = 0, size: int = 24) -> Image.Image:
    """A random RGB image of another size than the output (the pipelines must resize it)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    pipe = build_sd1(root / "sd1")
    controlnet = _perturbed_controlnet(pipe.unet)
    controlnet.save_pretrained(root / "cn", safe_serialization=True)
    return root, pipe, controlnet


def test_residuals_match_diffusers(models):
    root, _, ref = models
    ours = load_controlnet(root / "cn")
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999.0, 421.0])
    context = torch.randn(2, 77, 32)
    image = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want_down, want_mid = ref(x, t, context, image, conditioning_scale=0.7, return_dict=False)
        got_down, got_mid = ours(x, t, context, image, scale=0.7)
    assert len(got_down) == len(want_down) == 4  # conv_in, level 0 ResBlock and Downsample, level 1 ResBlock
    for got, want in [*zip(got_down, want_down, strict=True), (got_mid, want_mid)]:
        assert want.abs().max() > 0.1  # the perturbed zero convs really contribute
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_unet_with_residuals_matches_diffusers(models):
    """The U-Net's residual hook adds each residual to the skip diffusers adds it to."""
    root, pipe, ref = models
    sd = t2i.load(root / "sd1")
    torch.manual_seed(4)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        down, mid = ref(x, t, context, torch.rand(1, 3, SIZE, SIZE), return_dict=False)
        want = pipe.unet(x, t, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        got = sd.unet(x, t, context, down_residuals=list(down), mid_residual=mid)
        plain = sd.unet(x, t, context)
    assert (got - plain).abs().max() > 0.1  # the residuals change the output
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("guidance, scale", [(7.5, 1.0), (1.0, 0.6)])
def test_final_latents_match_diffusers_pipeline(models, guidance, scale):
    root, pipe, ref = models
    cn_pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=ref,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    cn_pipe.set_progress_bar_config(disable=True)
    image, prompt, steps, seed = _control_image(), "a red circle", 4, 11
    want = cn_pipe(prompt, image=image, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                   controlnet_conditioning_scale=scale, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="latent").images
    sd = t2i.load(root / "sd1")
    controlnet = load_controlnet(root / "cn")
    request = GenerationRequest(prompt, steps=steps, guidance=guidance, sampler="euler", seed=seed, width=SIZE,
                                height=SIZE, controlnet=controlnet, control_image=image, control_scale=scale)
    got = sd.run(request).latents
    plain = sd.run(GenerationRequest(prompt, steps=steps, guidance=guidance, sampler="euler", seed=seed,
                                     width=SIZE, height=SIZE)).latents
    err = ((got - want).abs().max() / want.std()).item()
    assert err < TOLERANCE, err
    assert ((plain - want).abs().max() / want.std()).item() > 100 * TOLERANCE  # the control really matters


def test_output_takes_the_control_image_size(models):
    """Without width/height the output has the control image's size rounded down to the VAE factor,
    as diffusers' pipeline makes it."""
    root, _, _ = models
    sd = t2i.load(root / "sd1")
    image = _control_image(size=13)  # 21 x 13
    out = sd.generate("a", steps=1, guidance=1.0, seed=0, controlnet=load_controlnet(root / "cn"),
                      control_image=image)
    assert out.images[0].size == (20, 12)


def test_zero_initialised_controlnet_changes_nothing():
    """A fresh ControlNet copied from a U-Net (the paper's initialisation) leaves its output unchanged,
    and the copy's encoder weights are the U-Net's."""
    torch.manual_seed(0)
    unet = UNet(UNET_CONFIGS["tiny"]).eval()
    net = ControlNet.from_unet(unet, embedding_channels=(8, 8, 8, 8)).eval()
    assert torch.equal(net.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        down, mid = net(x, t, context, torch.rand(1, 3, 64, 64))
        assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0
        assert torch.equal(unet(x, t, context, down_residuals=down, mid_residual=mid), unet(x, t, context))


def test_controlnet_that_does_not_fit_is_refused(models, tmp_path):
    """A ControlNet built for another U-Net (cross-attention width) is one clear error naming it."""
    root, _, _ = models
    torch.manual_seed(0)
    other = diffusers.UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                           norm_num_groups=8, cross_attention_dim=48, attention_head_dim=4,
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    diffusers.ControlNetModel.from_unet(other, conditioning_embedding_out_channels=EMBEDDING).save_pretrained(
        tmp_path / "cn48")
    sd = t2i.load(root / "sd1")
    with pytest.raises(ValueError, match=r"context_dim\) is 48, the U-Net's 32"):
        sd.generate("a", steps=1, seed=0, controlnet=load_controlnet(tmp_path / "cn48"),
                    control_image=_control_image())


def test_damaged_controlnet_folders_are_refused(models, tmp_path):
    root, _, _ = models
    with pytest.raises(FileNotFoundError, match="ControlNet folder not found"):
        load_controlnet(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    cfg = json.loads((root / "cn" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [32, 128]}))
    (tmp_path / "bad" / "diffusion_pytorch_model.safetensors").write_bytes(
        (root / "cn" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="other shapes than the config gives"):
        load_controlnet(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "global_pool_conditions": "yes",
                                                              "controlnet_conditioning_channel_order": "xyz"}))
    with pytest.raises(CheckpointError, match="controlnet_conditioning_channel_order"):
        load_controlnet(tmp_path / "bad")


def test_request_needs_both_controlnet_and_image(models):
    root, _, _ = models
    sd = t2i.load(root / "sd1")
    with pytest.raises(ValueError, match="needs both controlnet and control_image"):
        sd.generate("a", steps=1, seed=0, controlnet=load_controlnet(root / "cn"))


def test_cli_generate_with_controlnet(models, tmp_path, capsys):
    """`t2i generate --controlnet DIR --control-image IMG` writes the image the Python API makes."""
    from t2i.cli import main

    root, _, _ = models
    image = tmp_path / "edges.png"
    _control_image().save(image)
    out = tmp_path / "out.png"
    common = ["--model", str(root / "sd1"), "--steps", "2", "--seed", "5", "--width", str(SIZE), "--height",
              str(SIZE), "--sampler", "euler", "--quiet"]
    assert main(["generate", "a red circle", *common, "--controlnet", str(root / "cn"), "--control-image",
                 str(image), "--control-scale", "0.8", "--out", str(out), "--save-latents",
                 str(tmp_path / "l.safetensors")]) == 0
    from t2i.checkpoints.io import load_state_dict

    got = load_state_dict(tmp_path / "l.safetensors")["latents"]
    want = t2i.load(root / "sd1").generate("a red circle", steps=2, seed=5, width=SIZE, height=SIZE, sampler="euler",
                                           controlnet=load_controlnet(root / "cn"), control_image=_control_image(),
                                           control_scale=0.8).latents
    assert torch.equal(got, want)
    from PIL import Image

    from t2i.imageio import parse_parameters

    params = parse_parameters(Image.open(out).info["parameters"])  # the PNG says which ControlNet, how strong
    assert params["Controlnet"] == "cn" and float(params["Control scale"]) == 0.8, params


def test_size_warning_reads_the_control_image_size(models):
    from t2i.request_warnings import resolved_request
    from t2i.systems.base import GenerationRequest

    root, _, _ = models
    sd = t2i.load(root / "sd1")
    r = resolved_request(sd, GenerationRequest("a", controlnet=object(), control_image=_control_image(size=13)))
    assert (r.width, r.height) == (20, 12)  # what the pipeline draws (test_output_takes_the_control_image_size)


@pytest.mark.parametrize("args, message", [
    (["--control-image", "IMG"], "--controlnet and --control-image go together"),
    (["--controlnet", "CN", "--control-image", "nowhere.png"], "--control-image file not found"),
    (["--controlnet", "CN", "--control-image", "NOTIMG"], "is not a readable image"),
    (["--controlnet", "nowhere", "--control-image", "IMG"], "ControlNet not found"),
])
def test_cli_bad_control_inputs_are_one_line_errors(models, tmp_path, capsys, args, message):
    from t2i.cli import main

    root, _, _ = models
    _control_image().save(tmp_path / "edges.png")
    (tmp_path / "notimg.png").write_bytes(b"not a png")
    paths = {"IMG": str(tmp_path / "edges.png"), "NOTIMG": str(tmp_path / "notimg.png"), "CN": str(root / "cn"),
             "nowhere": str(tmp_path / "nowhere"), "nowhere.png": str(tmp_path / "nowhere.png")}
    args = [paths.get(a, a) for a in args]
    code = main(["generate", "x", "--model", str(root / "sd1"), "--steps", "1", "--out", str(tmp_path / "o.png"),
                 *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_sdxl_controlnet_residuals_match_diffusers(tmp_path):
    """An SDXL-like ControlNet (text_time micro-conditioning, linear projections, a level without attention)
    loads and computes diffusers' residuals."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                          norm_num_groups=8, cross_attention_dim=64,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                          attention_head_dim=(2, 4), use_linear_projection=True,
                                          transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    ref = _perturbed_controlnet(unet)
    ref.save_pretrained(tmp_path / "cn", safe_serialization=True)
    ours = load_controlnet(tmp_path / "cn")
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 3.0]), torch.randn(2, 77, 64)
    pooled, time_ids = torch.randn(2, 32), torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    image = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want_down, want_mid = ref(x, t, context, image, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                                  return_dict=False)
        got_down, got_mid = ours(x, t, context, image, text_embeds=pooled, time_ids=time_ids)
    for got, want in [*zip(got_down, want_down, strict=True), (got_mid, want_mid)]:
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
