"""The DeepFloyd IF family: parity with diffusers' IFPipeline (stage I) and IFSuperResolutionPipeline (stage II)
on tiny random folders built and saved by the test (a Unigram T5 tokenizer and T5EncoderModel; U-Nets with IF's
blocks: ResnetDownsampleBlock2D, SimpleCrossAttn*, scale-shift GELU ResBlocks, pooled text, the noise level
as a timestep class embedding; DDPMScheduler with learned_range and dynamic thresholding), the U-Net alone,
noise conditioning augmentation against diffusers' add_noise, and t2i's own IF file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import t2i
from t2i.checkpoints.diffusers_if import if_unet_config_from_diffusers, if_unet_config_to_diffusers
from t2i.diffusion.noise_augmentation import NoiseAugmentation
from t2i.nets.if_unet import IFUNet
from t2i.systems.base import GenerationRequest
from t2i.systems.deepfloyd_if import IFPipeline, noising_schedule
from t2i.systems.registry import resolve, systems

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_pixart import _randomize, _tokenizer  # noqa: E402  (the tiny T5 tokenizer the PixArt test trains)

# The randomised U-Net's eps is already about unit-sized, so its output layer keeps scale 1 (SD's latent tests
# scale by 8 because an untouched init barely moves the latents): each test instead shows that a 1% change of
# one setting moves the result by far more than the tolerance. Larger scales make this 8-step pixel sampler
# chaotic: at x8 and guidance 7, diffusers against itself with the text states changed by 1e-6 relative
# differs by 9e-3 of the std after 6 steps.
OUTPUT_SCALE = 1.0
PROMPT = "A red circle above a blue square "
BASE_STEPS, SR_STEPS = 8, 4
GUIDANCE, SR_GUIDANCE = 3.0, 2.0


def _unet(**kwargs):
    """A tiny IF U-Net (diffusers' own IF test layout): 2 levels of 32/64, text attention at the second,
    32-wide T5 states projected to 32; the eps half of the output convolution x OUTPUT_SCALE, the variance
    half / 4 (IF's variance values stay within about [-1, 1]; random ones far outside blow the samples up)."""
    cfg = {"sample_size": 16, "layers_per_block": 1, "block_out_channels": [32, 64],
           "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
           "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
           "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], "in_channels": 3,
           "out_channels": 6, "cross_attention_dim": 32, "encoder_hid_dim": 32, "attention_head_dim": 8,
           "addition_embed_type": "text", "addition_embed_type_num_heads": 2, "cross_attention_norm": "group_norm",
           "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu", "norm_num_groups": 8, **kwargs}
    unet = diffusers.UNet2DConditionModel(**cfg)
    _randomize(unet)
    with torch.no_grad():
        for part, scale in ((slice(0, 3), OUTPUT_SCALE), (slice(3, 6), 0.25)):
            unet.conv_out.weight[part].mul_(scale)
            unet.conv_out.bias[part].mul_(scale)
    return unet.eval()


# Stage II: IF-II's options (noise level embedded as a timestep, skipped time activation, sqrt(2)-scaled
# residuals, GELU after the summed embedding, its own time width, more blocks low, text-only attention).
SR_OPTIONS = {"sample_size": 32, "in_channels": 6, "class_embed_type": "timestep", "resnet_skip_time_act": True,
              "resnet_out_scale_factor": 1.414, "mid_block_scale_factor": 1.414, "time_embedding_act_fn": "gelu",
              "time_embedding_dim": 48, "layers_per_block": [1, 2], "only_cross_attention": [False, True]}


def _scheduler(**kwargs):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                                   beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95,
                                   sample_max_value=1.5, prediction_type="epsilon", variance_type="learned_range",
                                   **kwargs)


@pytest.fixture(scope="module")
def if_folders(tmp_path_factory):
    """(cascade folder holding stage_1/ and stage_2/, the diffusers stage I and stage II pipelines)."""
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    _randomize(t5, 0.3)
    root = tmp_path_factory.mktemp("if") / "if-tiny"
    tokenizer = _tokenizer(root)
    none = {"safety_checker": None, "feature_extractor": None, "watermarker": None, "requires_safety_checker": False}
    diffusers.IFPipeline(tokenizer, t5, _unet(), _scheduler(), **none).save_pretrained(root / "stage_1")
    noising = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    diffusers.IFSuperResolutionPipeline(tokenizer, t5, _unet(**SR_OPTIONS), _scheduler(), noising,
                                        **none).save_pretrained(root / "stage_2")
    base = diffusers.IFPipeline.from_pretrained(root / "stage_1")
    sr = diffusers.IFSuperResolutionPipeline.from_pretrained(root / "stage_2")
    for p in (base, sr):
        p.set_progress_bar_config(disable=True)
    return root, base, sr


def _relative(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / ref.std())


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("options", [{}, SR_OPTIONS, {**SR_OPTIONS, "class_embeddings_concat": True,
                                                      "addition_embed_type": None, "only_cross_attention": True}])
def test_the_unet_equals_diffusers(options):
    """One call on two timesteps (and two noise levels), from the diffusers config, strict state dict."""
    torch.manual_seed(1)
    ref = _unet(**options)
    cfg = if_unet_config_from_diffusers(dict(ref.config))
    assert if_unet_config_from_diffusers(if_unet_config_to_diffusers(cfg)) == cfg
    net = IFUNet(cfg).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    size = ref.config.sample_size
    x, context = torch.randn(2, ref.config.in_channels, size, size, generator=g), torch.randn(2, 7, 32, generator=g)
    t, levels = torch.tensor([999, 10]), (torch.tensor([250, 30]) if cfg.class_embed else None)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, class_labels=levels).sample
        got = net(x, t, context, levels)
        other = net(x, t, context.flip(0), levels)  # the text matters at this scale
    assert got.shape == want.shape == (2, 6, size, size)
    assert _relative(got, want) < 2e-5  # 1.02e-5 for options1 on an AVX2-only Zen 3 (its float paths), below on Zen 4
    assert _relative(other, want) > 1e-3
    if cfg.class_embed:
        assert _relative(net(x, t, context, levels.flip(0)).detach(), want) > 1e-3  # so does the noise level


def test_the_efficient_unet_runs_its_blocks_below_full_resolution():
    """Imagen's Efficient U-Net order: every level resamples first (down) / last (up), so no ResBlock sees the
    full resolution and the up path consumes one skip per down block; skip_scale multiplies those skips.
    diffusers has no such layout, and the config says so rather than writing a wrong one."""
    from t2i.nets.if_unet import IF_UNET_PRESETS, DepthToSpaceUp, IFResBlock, SpaceToDepthDown

    cfg = IF_UNET_PRESETS["tiny_sr"]
    assert cfg.efficient and cfg.size_multiple == 4
    torch.manual_seed(0)
    net = IFUNet(cfg).eval()
    sizes: dict[str, int] = {}
    for name, m in net.named_modules():
        if isinstance(m, (IFResBlock, SpaceToDepthDown, DepthToSpaceUp)):
            m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, out.shape[-1]))
    x, ctx, t, lv = torch.randn(2, 6, 32, 32), torch.randn(2, 5, 384), torch.tensor([900, 5]), torch.tensor([250, 0])
    with torch.no_grad():
        out = net(x, t, ctx, lv)
        unscaled = IFUNet(dataclasses.replace(cfg, skip_scale=1.0)).eval()
        unscaled.load_state_dict(net.state_dict())
        other = unscaled(x, t, ctx, lv)
    assert out.shape == (2, 6, 32, 32)
    assert sizes["down_blocks.0.downsamplers.0"] == 16 and sizes["down_blocks.0.resnets.0"] == 16
    assert sizes["up_blocks.1.upsamplers.0"] == 32  # the last up level ends at full resolution
    assert max(v for k, v in sizes.items() if "samplers" not in k) == 16  # no block at full resolution
    assert [len(b.resnets) for b in net.up_blocks] == list(reversed(cfg.layers_per_block))
    assert (out - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="Efficient"):
        if_unet_config_to_diffusers(cfg)


def test_the_folders_are_detected_as_deepfloyd_if_only(if_folders):
    root, _, _ = if_folders
    for path in (root, root / "stage_1"):
        assert resolve(path)[0].name == "deepfloyd_if"
        assert [s.name for s in systems() if s.detect(path)] == ["deepfloyd_if"]
    assert not any(s.detect(root / "stage_2") for s in systems())  # stage II alone cannot generate from text
    cascade, base = t2i.load(root), t2i.load(root / "stage_1")
    assert isinstance(cascade, IFPipeline) and cascade.sr is not None and base.sr is None
    assert cascade.capabilities.native_size == (32, 32) and base.capabilities.native_size == (16, 16)
    assert cascade.capabilities.size_multiple == 4 and cascade.scale == 2
    assert base.defaults.sampler == "ddpm" and base.defaults.steps == 100 and base.defaults.guidance == 7.0
    assert (cascade.sr_steps, cascade.sr_guidance, cascade.noise_level) == (50, 4.0, 250)
    with pytest.raises(ValueError, match="multiple of 4"):
        cascade.generate("a red circle", width=18, height=16, steps=1)


def test_stage_one_equals_ifpipeline(if_folders):
    """Two images of one prompt (seeds 11, 12; one generator each), CFG, learned variance, dynamic
    thresholding; a 1% guidance change, or static clipping instead of thresholding, is far outside the tolerance."""
    root, base, _ = if_folders
    want = base(PROMPT, num_inference_steps=BASE_STEPS, guidance_scale=GUIDANCE, num_images_per_prompt=2,
                generator=_generators(11, 2), output_type="pt", clean_caption=False).images
    pipe = t2i.load(root / "stage_1")
    request = GenerationRequest(PROMPT, seed=11, num_images=2, steps=BASE_STEPS, guidance=GUIDANCE)
    got = pipe.run(request).sample
    err = _relative(got, want)
    print(f"IF stage I: max |diff| / std = {err:.2e}, std {want.std().item():.3f}")
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert err < 2e-4
    assert _relative(pipe.run(dataclasses.replace(request, guidance=GUIDANCE * 1.01)).sample, want) > 1e-2
    pipe.base.schedule = dataclasses.replace(pipe.base.schedule, thresholding=False)  # clip_sample to +-1 instead
    assert _relative(pipe.run(request).sample, want) > 1e-2


def test_the_cascade_equals_ifpipeline_then_ifsuperresolutionpipeline(if_folders):
    """Stage I then stage II with the same generators carried on (diffusers' documented cascade use), the
    stage I sample handed over as a tensor; stage II at noise level 100 with CFG. Stage II is compared on
    t2i's own stage I sample (diffusers' stage I run first only to advance the generator as ours is), so the
    2e-4 measures stage II itself; the whole diffusers cascade is also matched, within stage I's error as
    stage II amplifies it."""
    root, base, sr = if_folders
    pipe = t2i.load(root)
    pipe.sr_steps, pipe.sr_guidance, pipe.noise_level = SR_STEPS, SR_GUIDANCE, 100
    steps: list[tuple[int, int]] = []
    request = GenerationRequest(PROMPT, seed=5, steps=BASE_STEPS, guidance=GUIDANCE)
    result = pipe.run(dataclasses.replace(request, callback=lambda i, n: steps.append((i, n))))
    ours_low = t2i.load(root / "stage_1").run(request).sample

    def diffusers_cascade(low: torch.Tensor | None) -> torch.Tensor:
        generators = _generators(5, 1)
        first = base(PROMPT, num_inference_steps=BASE_STEPS, guidance_scale=GUIDANCE, generator=generators,
                     output_type="pt", clean_caption=False).images
        return sr(PROMPT, image=first if low is None else low, num_inference_steps=SR_STEPS, guidance_scale=SR_GUIDANCE,
                  noise_level=100, generator=generators, output_type="pt", clean_caption=False).images

    want = diffusers_cascade(ours_low)
    err = _relative(result.sample, want)
    print(f"IF stage II: max |diff| / std = {err:.2e}, std {want.std().item():.3f}")
    assert result.sample.shape == want.shape == (1, 3, 32, 32)
    assert err < 2e-4
    assert _relative(result.sample, diffusers_cascade(None)) < 2e-3
    assert steps == [(i, BASE_STEPS + SR_STEPS) for i in range(1, BASE_STEPS + SR_STEPS + 1)]
    pipe.noise_level = 101  # the augmentation level reaches the output
    assert _relative(pipe.run(request).sample, want) > 1e-2


def test_super_resolve_equals_ifsuperresolutionpipeline_on_a_given_image(if_folders):
    """Stage II alone on an image it is given (IFSuperResolutionPipeline's own use, fresh generators): the same
    output from the same seed within 2e-4 of its std, per image seeds seed + i; a pipeline without stage II and
    a low-res batch that does not match the prompts are refused."""
    root, _, sr = if_folders
    pipe = t2i.load(root)
    pipe.sr_steps, pipe.sr_guidance, pipe.noise_level = SR_STEPS, SR_GUIDANCE, 100
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = pipe.super_resolve([PROMPT, PROMPT], low, seed=7)
    for i in range(2):
        want = sr(PROMPT, image=low[i:i + 1], num_inference_steps=SR_STEPS, guidance_scale=SR_GUIDANCE,
                  noise_level=100, generator=_generators(7 + i, 1), output_type="pt", clean_caption=False).images
        err = _relative(ours[i:i + 1], want)
        print(f"IF super_resolve image {i}: max |diff| / std = {err:.2e}")
        assert ours.shape == (2, 3, 32, 32) and err < 2e-4
    assert _relative(pipe.super_resolve([PROMPT], low[:1], seed=7, noise_level=400), ours[:1]) > 1e-2
    with pytest.raises(ValueError, match="one prompt per image"):
        pipe.super_resolve([PROMPT], low, seed=7)
    with pytest.raises(ValueError, match="no stage II"):
        t2i.load(root / "stage_1").super_resolve([PROMPT], low[:1])


def test_t2i_generate_runs_the_cascade_folder_as_the_api_does(if_folders, tmp_path):
    """`t2i generate --model CASCADE_FOLDER`: stage I at the requested steps, stage II at its defaults (50 steps,
    guidance 4, noise level 250), the final 32x32 image equal to the Python API's."""
    from PIL import Image

    from t2i.cli import main

    root, _, _ = if_folders
    out = tmp_path / "if.png"
    assert main(["generate", PROMPT, "--model", str(root), "--steps", "3", "--seed", "9", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (32, 32)
        pixels = im.convert("RGB").tobytes()
    assert pixels == t2i.load(root).run(GenerationRequest(PROMPT, seed=9, steps=3)).images[0].tobytes()


def test_noise_augmentation_equals_diffusers_add_noise():
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    aug = NoiseAugmentation(noising_schedule().alphas_cumprod())
    g = torch.Generator().manual_seed(0)
    image, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    levels = torch.tensor([0, 250, 999])
    assert torch.allclose(aug.apply(image, levels, noise), sched.add_noise(image, noise, levels), atol=1e-6)
    fixed, at = aug.at_level(image, 250, noise)
    assert at.tolist() == [250] * 3 and torch.allclose(fixed[1], aug.apply(image, levels, noise)[1])
    drawn, sampled = NoiseAugmentation(aug.alphas_cumprod, max_level=300).sample(torch.zeros(64, 3, 4, 4), g)
    assert 0 <= int(sampled.min()) and int(sampled.max()) <= 300 and len(set(sampled.tolist())) > 10
    assert torch.allclose(drawn.flatten(1).std(1), (1 - aug.alphas_cumprod[sampled]).sqrt(), rtol=0.5)
    with pytest.raises(ValueError, match="noise levels"):
        aug.apply(image, torch.tensor([0, 1, 1000]), noise)


def test_the_t2i_file_round_trips(tmp_path):
    """write_tiny's file loads with both stages, generates the final size (also in bf16, stage II's low-res input
    included), and refuses a foreign tensor."""
    from t2i.checkpoints.io import CheckpointError, load_state_dict, read_config, save_with_config
    from t2i.systems.deepfloyd_if import SYSTEM

    path = SYSTEM.write_tiny(tmp_path / "tiny", 0)
    pipe = t2i.load(path)
    assert pipe.sr is not None and pipe.capabilities.native_size == (32, 32)
    result = pipe.generate("a red circle", seed=1, steps=2)
    assert result.sample.shape == (1, 3, 32, 32)
    half = t2i.load(path, precision="bf16").generate("a red circle", seed=1, steps=2).sample  # both stages bf16
    assert _relative(half, result.sample) < 0.2
    low = dataclasses.replace(pipe.defaults)
    assert low.width == 32
    state = load_state_dict(path)
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_with_config(state, bad, read_config(path, "IF"), "deepfloyd_if")
    with pytest.raises(CheckpointError):
        t2i.load(bad)


def test_the_request_noise_level_reaches_stage_two_and_the_png(tmp_path):
    """A request's noise_level is stage II's augmentation level for that request (the pipeline's own level
    for requests without one, and unchanged by one), recorded in the PNG so the image regenerates from it;
    a pipeline without stage II refuses it by name, and a level outside the noising schedule is refused."""
    from t2i.imageio import parse_parameters, request_fields
    from t2i.systems.base import UnsupportedOption, check_request
    from t2i.systems.deepfloyd_if import SYSTEM

    pipe = t2i.load(SYSTEM.write_tiny(tmp_path / "tiny", 0))
    request = GenerationRequest("a red circle", seed=1, steps=2)
    default = pipe.run(request)
    assert f"Noise level: {pipe.noise_level}," in default.images[0].info["parameters"] + ","
    same = pipe.run(dataclasses.replace(request, noise_level=pipe.noise_level))
    assert torch.equal(same.sample, default.sample)
    check_request(pipe, dataclasses.replace(request, noise_level=900))
    other = pipe.run(dataclasses.replace(request, noise_level=900))
    assert _relative(other.sample, default.sample) > 1e-2 and pipe.noise_level == 100
    params = other.images[0].info["parameters"]
    read = request_fields(parse_parameters(params))
    assert read.pop("model") == pipe.name and read.pop("precision", "fp32") == "fp32" and read["noise_level"] == 900
    again = pipe.run(GenerationRequest(**read))
    assert torch.equal(again.sample, other.sample)
    with pytest.raises(ValueError, match="noise_level"):
        pipe.run(dataclasses.replace(request, noise_level=1000))
    base_only = IFPipeline(pipe.base, pipe.text_encoder, defaults=dataclasses.replace(pipe.defaults, width=16,
                                                                                       height=16))
    with pytest.raises(UnsupportedOption, match="noise_level"):
        check_request(base_only, dataclasses.replace(request, noise_level=900))
    assert "Noise level" not in base_only.run(request).images[0].info["parameters"]
