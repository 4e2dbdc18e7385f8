"""unCLIP / DALL-E 2 (issue 20): the diffusion prior, the Karlo decoder and super-resolution U-Nets against
diffusers on tiny random weights, the whole UnCLIPPipeline from a folder, and the family's own uses."""

from __future__ import annotations

import json

import pytest
import torch

from t2i.checkpoints.diffusers_unclip import (
    prior_config_from_diffusers,
    prior_state_dict_from_diffusers,
    unet_config_from_diffusers,
)
from t2i.nets.prior_transformer import PriorTransformer
from t2i.nets.unclip_unet import UnCLIPUNet

diffusers = pytest.importorskip("diffusers")


def _randomize(module: torch.nn.Module, std: float = 0.3) -> None:
    """Every parameter random (the reference zero-initialises positions, the query and the statistics)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def test_prior_matches_diffusers_prior_transformer():
    torch.manual_seed(0)
    ref = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16,
                                     num_embeddings=8, additional_embeddings=4, norm_in_type="layer")
    _randomize(ref)
    ours = PriorTransformer(prior_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(prior_state_dict_from_diffusers(ref.state_dict()), strict=True)
    x, t, embeds, states = torch.randn(3, 16), torch.tensor([5, 500, 999]), torch.randn(3, 16), torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    with torch.no_grad():
        expected = ref(x, t, proj_embedding=embeds, encoder_hidden_states=states,
                       attention_mask=mask).predicted_image_embedding
        got = ours(x, t, embeds, states, mask)
        unmasked = ours(x, t, embeds, states)  # the padding mask must matter (rows 1 and 2)
        assert torch.allclose(ours.denormalize(got), ref.post_process_latents(expected), atol=1e-5)
    assert (got - expected).abs().max() < 1e-5
    assert (unmasked[1:] - expected[1:]).abs().max() > 1e-2


def _decoder_reference():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity")


def _super_res_reference():
    return diffusers.UNet2DModel(sample_size=16, layers_per_block=1, block_out_channels=(16, 32), in_channels=6,
                                 out_channels=3, norm_num_groups=8,
                                 down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                 up_block_types=("ResnetUpsampleBlock2D",) * 2)


def test_decoder_unet_matches_diffusers():
    torch.manual_seed(1)
    ref = _decoder_reference()
    ours = UnCLIPUNet(unet_config_from_diffusers({**ref.config, "_class_name": "UNet2DConditionModel"}))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    context, class_emb = torch.randn(2, 6, 24), torch.randn(2, 64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, class_labels=class_emb, attention_mask=mask).sample
        got = ours(x, t, context, mask, class_emb)
    assert (got - expected).abs().max() < 1e-5 * expected.std() * 10


def test_super_res_unet_matches_diffusers():
    torch.manual_seed(2)
    ref = _super_res_reference()
    ours = UnCLIPUNet(unet_config_from_diffusers({**ref.config, "_class_name": "UNet2DModel"}))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t = torch.randn(2, 6, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        assert (ours(x, t) - ref(x, t).sample).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------
# The whole UnCLIPPipeline (Karlo layout) from a folder
# ---------------------------------------------------------------------------------------

OUTPUT_SCALE = 4.0  # decoder and super-resolution outputs scaled up so a wrong step cannot hide
TOLERANCE = 2e-4  # max |ours - diffusers| relative to the std of diffusers' values


def _karlo_parts(folder):
    """The components both Karlo pipelines share: CLIP text tower and tokenizer, text projection, decoder,
    super-resolution, their schedulers (tiny, random, output layers scaled up)."""
    from sd_oracles import _clip, _tokenizer

    e = 32  # CLIP width = projection = prior embedding, as Karlo's (768 each)
    decoder = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    text_proj = diffusers.pipelines.deprecated.unclip.UnCLIPTextProjModel(
        clip_extra_context_tokens=2, clip_embeddings_dim=e, time_embed_dim=64, cross_attention_dim=24)
    _randomize(text_proj, 0.2)
    super_res = [_super_res_reference() for _ in range(2)]
    for net in (decoder, *super_res):
        with torch.no_grad():
            net.conv_out.weight.mul_(OUTPUT_SCALE)
            net.conv_out.bias.mul_(OUTPUT_SCALE)
    scheduler = diffusers.UnCLIPScheduler
    return dict(text_encoder=_clip(e, 2, "gelu", 49407, projection=e),
                tokenizer=_tokenizer(folder / "tokenizer", "<|endoftext|>"), decoder=decoder, text_proj=text_proj,
                super_res_first=super_res[0], super_res_last=super_res[1],
                decoder_scheduler=scheduler(variance_type="learned_range", prediction_type="epsilon"),
                super_res_scheduler=scheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


def build_karlo(folder):
    """A tiny random diffusers UnCLIPPipeline (Karlo's layout), saved to `folder`; returns the pipeline."""
    torch.manual_seed(0)
    parts = _karlo_parts(folder)
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, num_layers=2, embedding_dim=32,
                                       num_embeddings=77)
    _randomize(prior, 0.2)
    with torch.no_grad():
        prior.clip_std.abs_().add_(0.5)
    prior_scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                clip_sample_range=5.0)
    pipe = diffusers.UnCLIPPipeline(prior=prior, prior_scheduler=prior_scheduler, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_karlo_variations(folder):
    """A tiny random diffusers UnCLIPImageVariationPipeline (CLIP image tower, no prior), saved to `folder`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    parts = _karlo_parts(folder)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8))
    processor = CLIPImageProcessor(size=32, crop_size=32)
    pipe = diffusers.UnCLIPImageVariationPipeline(image_encoder=vision, feature_extractor=processor, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def reference_run(pipe, prompt, seed, steps):
    """diffusers' run from one seed: (prior image embeddings, decoder output, final image in [0, 1] (B, 3, H, W))."""
    seen = {}

    def grab_embeddings(_module, _args, kwargs):
        seen["embeds"] = kwargs["image_embeddings"].clone()

    step = pipe.decoder_scheduler.step

    def grab_decoder(*args, **kwargs):
        out = step(*args, **kwargs)
        seen["small"] = out.prev_sample.clamp(-1, 1).clone()
        return out

    handle = pipe.text_proj.register_forward_pre_hook(grab_embeddings, with_kwargs=True)
    pipe.decoder_scheduler.step = grab_decoder
    try:
        image = pipe(prompt, prior_num_inference_steps=steps, decoder_num_inference_steps=steps,
                     super_res_num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                     prior_guidance_scale=4.0, decoder_guidance_scale=5.0, output_type="np").images
    finally:
        handle.remove()
        pipe.decoder_scheduler.step = step
    return seen["embeds"], seen["small"], torch.from_numpy(image).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    import t2i

    folder = tmp_path_factory.mktemp("karlo") / "karlo"
    reference = build_karlo(folder)
    return reference, t2i.load(folder), folder


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().std()).item()


def test_karlo_folder_generates_what_diffusers_generates(karlo):
    from t2i.seeds import seed_generators

    reference, ours, _ = karlo
    prompt, seed, steps = "a red circle above a blue square", 3, 4
    embeds, small, image = reference_run(reference, prompt, seed, steps)
    ours.with_settings(prior_steps=steps, prior_guidance=4.0, super_res_steps=steps)
    # the stages one by one, on one generator, as the pipeline runs them
    generators = seed_generators([seed])
    cond, uncond = ours.encode_text([prompt]), ours.encode_text([""])
    got_embeds = ours.sample_prior(cond, uncond, generators)
    assert _relative(got_embeds, embeds) < TOLERANCE
    got_small = ours.sample_decoder(got_embeds, cond, uncond, generators, steps, 5.0)
    assert _relative(got_small, small) < TOLERANCE
    got_image = ours.super_resolve(got_small, generators)
    assert _relative(got_image * 0.5 + 0.5, image) < TOLERANCE
    # and the Pipeline protocol run gives the same final image
    result = ours.generate(prompt, seed=seed, steps=steps, guidance=5.0)
    assert _relative(result.sample * 0.5 + 0.5, image) < TOLERANCE
    assert result.images[0].size == (16, 16)


def test_karlo_folder_is_detected_as_unclip_only(karlo):
    from t2i.systems.registry import systems

    _, _, folder = karlo
    assert [s.name for s in systems() if s.detect(folder)] == ["unclip"]


# ---------------------------------------------------------------------------------------
# The family's own uses, on its tiny t2i model (the shipped shapes CLIP)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import t2i
    from t2i.systems.unclip import write_tiny

    pipe = t2i.load(write_tiny(tmp_path_factory.mktemp("unclip_tiny"), 0))
    with torch.no_grad():  # a random decoder barely moves the pixels; scaled up, its conditioning shows
        pipe.unet.conv_out.weight.mul_(3.0)
    return pipe


def test_slerp_ends_at_both_embeddings_and_keeps_the_norm_between():
    from t2i.systems.unclip import slerp

    a, b = torch.randn(2, 8), 3 * torch.randn(2, 8)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(mid, a), cos(mid, b), atol=1e-4)  # halfway in angle


def test_two_prior_samples_keep_the_one_closer_to_the_text(tiny):
    from t2i.seeds import seed_generators

    text = tiny.encode_text(["a red circle", "two blue squares"])
    empty = tiny.encode_text(["", ""])
    generators = seed_generators([1, 2])
    first, second = (tiny.sample_prior(text, empty, generators, steps=2) for _ in range(2))
    picked = tiny.pick_closest([first, second], text.embeds)
    best = torch.maximum((first * text.embeds).sum(-1), (second * text.embeds).sum(-1))
    assert torch.allclose((picked * text.embeds).sum(-1), best)
    assert not torch.equal(first, second)  # the second draw continues each image's generator
    tiny.with_settings(prior_candidates=2)
    try:
        two = tiny.generate("a red circle", seed=1, steps=2)
    finally:
        tiny.with_settings(prior_candidates=1)
    one = tiny.generate("a red circle", seed=1, steps=2)
    assert two.sample.shape == one.sample.shape and not torch.equal(two.sample, one.sample)


def test_variations_decode_the_image_embedding_with_new_noise(tiny):
    source = tiny.generate("a red circle", seed=5, steps=2).images[0]
    variations = tiny.variations(source, num_images=2, seed=11, steps=2)
    assert len(variations.images) == 2 and variations.seeds == [11, 12]
    assert not torch.equal(variations.sample[0], variations.sample[1])  # new noise per image
    z = tiny.embed_images([source])
    again = tiny.decode(z, seed=12, steps=2)
    assert torch.allclose(again.sample[0], variations.sample[1], atol=1e-5)  # seed s + i, whatever the batch
    other = tiny.decode(-z, seed=12, steps=2)  # the embedding is what the decoder reads
    assert (other.sample - again.sample).abs().max() > 1e-3
    assert "unCLIP: variation" in variations.images[0].info["parameters"]
    # without a caption the decoder guides by StageSettings.embedding_guidance, not the text-to-image default
    assert tiny.settings.embedding_guidance == 8.0 != tiny.defaults.guidance
    assert "CFG scale: 8.0" in variations.images[0].info["parameters"]
    assert torch.equal(tiny.decode(z, seed=12, steps=2, guidance=8.0).sample, again.sample)
    assert not torch.equal(tiny.decode(z, seed=12, steps=2, guidance=tiny.defaults.guidance).sample, again.sample)
    captioned = tiny.decode(z, "a red circle", seed=12, steps=2)  # a caption: the model's own default
    assert f"CFG scale: {tiny.defaults.guidance}" in captioned.images[0].info["parameters"]


def test_interpolation_and_text_diff_start_at_the_image_and_share_one_seed(tiny):
    a = tiny.generate("a red circle", seed=5, steps=2).images[0]
    b = tiny.generate("a blue square", seed=6, steps=2).images[0]
    path = tiny.interpolate(a, b, num_images=3, seed=4, steps=2)
    za, zb = tiny.embed_images([a, b]).chunk(2)
    assert path.seeds == [4, 4, 4]
    assert torch.allclose(path.sample[0], tiny.decode(za, seed=4, steps=2).sample[0], atol=1e-5)
    assert torch.allclose(path.sample[2], tiny.decode(zb, seed=4, steps=2).sample[0], atol=1e-5)
    diff = tiny.text_diff(a, "a red circle", "a blue circle", num_images=3, seed=4, steps=2)
    assert torch.allclose(diff.sample[0], path.sample[0], atol=1e-5)  # amount 0: the image itself
    assert (diff.sample[2] - diff.sample[0]).abs().max() > 1e-3


def test_the_embedding_quantizer_keeps_an_embedding_and_draws_dots_from_the_top_half():
    """unCLIP sec. 2.2's AR prior codes: PCA by decreasing variance, uniform buckets per component (back within
    a bucket), and the dot-product token sampled from the top half of its training distribution."""
    import torch.nn.functional as F

    from t2i.nets.ar_prior import ARPriorConfig, EmbeddingQuantizer, cosine
    from t2i.seeds import seed_generators

    torch.manual_seed(0)
    cfg = ARPriorConfig(embed_dim=16, components=4, buckets=64, dot_buckets=8)
    basis = torch.linalg.qr(torch.randn(16, 4))[0].T  # (4, 16) orthonormal rows
    z = (torch.randn(2000, 4) * torch.tensor([3.0, 2.0, 1.0, 0.5])) @ basis + 1.0  # rank 4 around a mean
    t = z + 2.0 * torch.randn_like(z)
    q = EmbeddingQuantizer(cfg)
    q.fit(z, t)
    assert torch.allclose(q.scales, torch.tensor([3.0, 2.0, 1.0, 0.5]), rtol=0.1)  # ordered, measured
    codes = q.encode(z)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < 64 and len(codes.unique()) > 32
    assert F.cosine_similarity(q.decode(codes), z).min() > 0.99
    y = (z - q.mean) @ q.basis.T / q.scales  # (N, K) in standard deviations
    inside = y.abs().amax(1) < cfg.range_sigmas
    error = ((q.decode(codes) - z) @ q.basis.T / q.scales)[inside]
    assert error.abs().max() <= 2 * 4.0 / 64 / 2 + 1e-4  # within half a bucket of +-4 sigma in 64
    train = q.dot_tokens(cosine(z, t))
    drawn = q.sample_dot_tokens(seed_generators(list(range(300))))
    assert (train >= drawn.min()).float().mean() >= 0.5  # the lowest drawn bucket is the median's ...
    assert all((train > b).float().mean() < 0.5 for b in drawn.unique())  # ... and none below it
    assert len(drawn.unique()) > 1


def _ar_tiny(seed: int = 0):
    """A tiny t2i unCLIP whose prior is the autoregressive one (random weights, fitted statistics)."""
    from dataclasses import replace

    from t2i.nets.ar_prior import AR_PRIOR_PRESETS
    from t2i.systems.unclip import UnCLIPNets, load_clip, pipeline_from_nets
    from t2i.train.unclip import resolve_model_config

    clip = load_clip("shapes").eval()
    cfg = resolve_model_config(_train_config("-", "prior", prior="ar"), clip)
    assert cfg.ar_prior == replace(AR_PRIOR_PRESETS["tiny"], embed_dim=128)
    torch.manual_seed(seed)
    nets = UnCLIPNets(cfg).eval()
    with torch.no_grad():
        for p in nets.prior.transformer.parameters():  # the head starts at zero: make every logit matter
            p.normal_(0, 0.3)
        z = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1)
        nets.prior.quantizer.fit(z, z + torch.randn_like(z))
    return pipeline_from_nets(nets, clip, "ar-tiny")


def test_the_autoregressive_prior_draws_each_code_from_the_guided_full_pass():
    """The pipeline samples the AR prior through the KV cache with CFG on the logits (the empty caption and the
    null dot token as the unconditional branch): the same codes as full passes over the growing prefix."""
    from t2i.nets.ar_prior import ARPrior
    from t2i.seeds import seed_generators
    from t2i.tokens import CFGTokenModel, GuidedCond, sample_autoregressive

    pipe = _ar_tiny()
    prior = pipe.prior
    assert isinstance(prior, ARPrior) and pipe.prior_steps == prior.cfg.components == 4
    text, empty = pipe.encode_text(["a red circle", "two blue squares"]), pipe.encode_text(["", ""])
    z = pipe.sample_prior(text, empty, seed_generators([1, 2]), guidance=3.0)
    generators = seed_generators([1, 2])
    dots = prior.quantizer.sample_dot_tokens(generators)
    null = torch.full_like(dots, prior.cfg.null_dot)
    cond = GuidedCond(prior.condition(dots, text.embeds, text.states, text.mask),
                      prior.condition(null, empty.embeds, empty.states, empty.mask))
    codes = sample_autoregressive(CFGTokenModel(prior, 3.0), cond, 4, generators=generators)  # no cache
    assert torch.allclose(z, prior.quantizer.decode(codes), atol=1e-6)
    assert z.shape == (2, 128) and not torch.allclose(z[0], z[1])
    unguided = pipe.sample_prior(text, empty, seed_generators([1, 2]), guidance=1.0)
    assert not torch.allclose(unguided, z)  # guidance changes the draws


def test_the_autoregressive_prior_trains_resumes_and_feeds_the_decoder(tmp_path):
    import t2i
    from t2i.nets.ar_prior import ARPrior
    from t2i.train.unclip import train_unclip

    assert train_unclip(_train_config(tmp_path / "prior", "prior", prior="ar", steps=30, batch_size=16, lr=3e-3,
                                      ckpt_every=30, export_every=30, stats_images=64)) == 0
    losses = _losses(tmp_path / "prior", "unclip/prior_loss")
    assert len(losses) == 30 and abs(losses[0] - torch.log(torch.tensor(16.0)).item()) < 0.1  # uniform at start
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])  # the AR prior learns its codes
    prior_file = tmp_path / "prior" / "model.safetensors"
    pipe = t2i.load(prior_file)
    assert isinstance(pipe.prior, ARPrior) and pipe.prior.quantizer.scales.std() > 0  # statistics measured
    from t2i.checkpoints.io import read_config

    saved = read_config(prior_file, "an unCLIP model file", "unclip")
    assert saved["prior"] is None and saved["ar_prior"]["components"] == 4  # the file holds one prior
    steps: list[tuple[int, int]] = []
    image = pipe.generate("a red circle", seed=1, steps=2, callback=lambda i, n: steps.append((i, n)))
    assert image.sample.shape == (1, 3, 16, 16) and steps[-1] == (4 * 2 + 2, 4 * 2 + 2)  # 2 candidates x 4 codes
    half = t2i.load(prior_file, "bf16")  # the quantizer computes in float32 beside bf16 weights
    assert half.generate("a red circle", seed=1, steps=2).sample.shape == (1, 3, 16, 16)
    # the statistics are measured once: a resumed run reads them back and ends where an uninterrupted one does
    from t2i.checkpoints.io import load_state_dict

    short = dict(prior="ar", steps=4, stats_images=64)
    assert train_unclip(_train_config(tmp_path / "whole", "prior", **short)) == 0
    assert train_unclip(_train_config(tmp_path / "cut", "prior", **{**short, "steps": 2})) == 0
    assert train_unclip(_train_config(tmp_path / "cut", "prior", **short), resume=True) == 0
    whole, cut = (load_state_dict(tmp_path / d / "model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole) and "prior.quantizer.basis" in whole
    # the decoder run keeps the AR prior it starts from
    assert train_unclip(_train_config(tmp_path / "decoder", "decoder", init=str(prior_file), steps=2)) == 0
    both = t2i.load(tmp_path / "decoder" / "model.safetensors")
    assert isinstance(both.prior, ARPrior)
    assert all(torch.equal(v, both.prior.state_dict()[k]) for k, v in pipe.prior.state_dict().items())


def test_karlo_folder_without_an_image_tower_refuses_variations(karlo):
    _, ours, _ = karlo
    with pytest.raises(ValueError, match="image tower"):
        ours.variations(ours.generate("a red circle", seed=1, steps=2).images[0])


# ---------------------------------------------------------------------------------------
# Training on the shapes world
# ---------------------------------------------------------------------------------------


def _train_config(out, part, **overrides):
    from t2i.train.unclip import UnCLIPTrainConfig

    settings = dict(out=str(out), train=part, prior_preset="tiny", decoder_preset="tiny_decoder", image_size=16,
                    steps=4, batch_size=8, lr=1e-3, warmup=1, log_every=1, image_every=0, ckpt_every=2,
                    export_every=2, stats_images=32, sample_steps=2, threads=1)
    return UnCLIPTrainConfig(**{**settings, **overrides})


def _losses(out, key):
    lines = (out / "log.txt").read_text().splitlines()
    return [float(w.split("=")[1]) for line in lines for w in line.split() if w.startswith(key + "=")]


def test_prior_then_decoder_train_and_export_a_loadable_model(tmp_path):
    import t2i
    from t2i.train.unclip import train_unclip

    # the prior run's file holds another (random) decoder shape: the decoder run replaces it, keeps the prior
    assert train_unclip(_train_config(tmp_path / "prior", "prior", steps=30, batch_size=16, lr=3e-3, ckpt_every=30,
                                      export_every=30, decoder_preset="shapes_decoder_32_s")) == 0
    losses = _losses(tmp_path / "prior", "unclip/prior_loss")
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])  # the prior learns
    prior_file = tmp_path / "prior" / "model.safetensors"
    assert train_unclip(_train_config(tmp_path / "decoder", "decoder", init=str(prior_file), steps=30,
                                      ckpt_every=30, export_every=30)) == 0
    losses = _losses(tmp_path / "decoder", "unclip/simple")
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])  # the decoder learns
    pipe, trained_prior = t2i.load(tmp_path / "decoder" / "model.safetensors"), t2i.load(prior_file)
    assert pipe.family == "unclip"
    for name, p in trained_prior.prior.state_dict().items():  # the decoder run kept the prior it started from
        assert torch.equal(p, pipe.prior.state_dict()[name]), name
    assert pipe.prior.clip_std.std() > 0  # the embedding statistics were measured, not left at 1
    assert pipe.decoder_schedule.prediction_type == "v_prediction" and pipe.settings.prior_candidates == 2
    assert pipe.generate("a red circle", seed=1, steps=2).sample.shape == (1, 3, 16, 16)


def test_a_resumed_decoder_run_equals_an_uninterrupted_one(tmp_path):
    from t2i.checkpoints.io import load_state_dict
    from t2i.train.unclip import train_unclip

    assert train_unclip(_train_config(tmp_path / "whole", "decoder")) == 0
    assert train_unclip(_train_config(tmp_path / "cut", "decoder", steps=2)) == 0
    assert train_unclip(_train_config(tmp_path / "cut", "decoder"), resume=True) == 0
    whole = load_state_dict(tmp_path / "whole" / "model.safetensors")
    cut = load_state_dict(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_unclip_cli_writes_variations_interpolations_and_text_diffs(tmp_path):
    from t2i.cli import main
    from t2i.imageio import read_parameters
    from t2i.systems.unclip import write_tiny

    model = write_tiny(tmp_path / "model", 0)
    source = tmp_path / "source.png"
    assert main(["generate", "a red circle", "--model", str(model), "--out", str(source), "--steps", "2",
                 "--seed", "1"]) == 0
    common = ["--model", str(model), "--steps", "2", "--seed", "3"]
    assert main(["unclip", "variations", str(source), "--num", "2", "--out", str(tmp_path / "v"), *common]) == 0
    assert main(["unclip", "interpolate", str(source), str(source), "--num", "3", "--out", str(tmp_path / "i"),
                 *common]) == 0
    assert main(["unclip", "text-diff", str(source), "--caption", "a red circle", "--target", "a blue circle",
                 "--num", "2", "--out", str(tmp_path / "t"), *common]) == 0
    assert len(list((tmp_path / "v").glob("*.png"))) == 2 and len(list((tmp_path / "i").glob("*.png"))) == 3
    assert "unCLIP: text diff" in read_parameters(tmp_path / "t" / "source_text_diff_001.png")
    assert main(["unclip", "variations", str(source), "--model", "no_such_model", "--out", str(tmp_path)]) == 2
    assert main(["unclip", "judge-variations", "--model", str(model), "--n", "2", "--num", "1", "--steps", "2",
                 "--guidance", "5", "--out", str(tmp_path / "j")]) == 0
    report = json.loads((tmp_path / "j" / "results.json").read_text())
    assert report["n"] == 2 and report["source_pass"] == 1.0  # rendered truth passes; the judge is the ceiling
    assert (report["steps"], report["guidance"]) == (2, 5.0)  # the decoder settings it was measured with
    assert len(report["pairs"]) == 2 and sum(own for own, _ in report["pairs"]) == round(report["variation_pass"] * 2)
    assert 0.0 <= report["variation_pass"] <= 1.0 and 0.0 <= report["random_pass"] <= 1.0
    assert main(["unclip", "prior-retrieval", "--model", str(model), "--n", "3", "--steps", "2",
                 "--guidance", "2"]) == 0


def test_prior_retrieval_finds_the_scene_of_a_prior_that_returns_it(tiny, monkeypatch):
    """An oracle prior (the true image embeddings) ranks every caption's own scene first; a constant one doesn't."""
    from t2i.eval.unclip_variations import prior_retrieval

    truth = {}
    original = tiny.embed_images

    def remember(images):
        truth["z"] = original(images)
        return truth["z"]

    monkeypatch.setattr(tiny, "embed_images", remember)
    monkeypatch.setattr(tiny, "sample_prior", lambda cond, *_: truth["z"][: cond.embeds.shape[0]])
    oracle = prior_retrieval(tiny, n=6)
    assert oracle["top1"] == 1.0 and oracle["cos_own"] > oracle["cos_other"]
    monkeypatch.setattr(tiny, "sample_prior", lambda cond, *_: truth["z"][:1].expand(cond.embeds.shape[0], -1))
    assert prior_retrieval(tiny, n=6)["top1"] <= 0.5


def test_an_init_image_request_is_a_variation_and_strength_moves_it_to_the_prompt(tiny):
    from t2i.systems.base import GenerationRequest, check_request

    source = tiny.generate("a red circle", seed=5, steps=2).images[0]
    check_request(tiny, GenerationRequest("", init_image=source, strength=0.5))  # both are options here
    request = tiny.generate("", init_image=source, seed=3, steps=2)
    assert torch.allclose(request.sample, tiny.variations(source, 1, seed=3, steps=2).sample, atol=1e-5)
    half = tiny.generate("a blue square", init_image=source, strength=0.5, seed=3, steps=2)
    full = tiny.generate("a blue square", init_image=source, strength=1.0, seed=3, steps=2)
    plain = tiny.generate("a blue square", seed=3, steps=2)
    assert torch.allclose(full.sample, plain.sample, atol=1e-5)  # all the way: text-to-image
    assert (half.sample - full.sample).abs().max() > 1e-3
    with pytest.raises(ValueError, match="strength"):
        tiny.generate("x", init_image=source, strength=1.5, steps=2)


def test_variations_through_generate_init_image_and_the_servers_img2img(tmp_path):
    import base64
    import io

    from PIL import Image

    import t2i
    from t2i.cli import main
    from t2i.systems.unclip import write_tiny

    model = write_tiny(tmp_path / "model", 0)
    pipe = t2i.load(model)
    source = tmp_path / "source.png"
    pipe.generate("a red circle", seed=5, steps=2).images[0].save(source)
    with Image.open(source) as im:  # a variation read with the prompt as the decoder's text: the API's answer
        expected = pipe.generate("a red circle", init_image=im.convert("RGB"), seed=3, steps=2).images[0].tobytes()
    out = tmp_path / "cli.png"
    assert main(["generate", "a red circle", "--model", str(model), "--init-image", str(source), "--seed", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.convert("RGB").tobytes() == expected

    pytest.importorskip("fastapi")
    from test_families import _post

    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import ServeConfig

    body = {"prompt": "a red circle", "seed": 3, "steps": 2, "denoising_strength": 0.0,
            "init_images": [base64.b64encode(source.read_bytes()).decode()]}
    with BackgroundServer(create_app(pipe, ServeConfig())) as server:
        status, reply = _post(server.url + "/sdapi/v1/img2img", body)
    assert status == 200, reply
    image = Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB")
    assert image.tobytes() == expected


def test_karlo_variation_folder_makes_the_variations_diffusers_makes(tmp_path):
    import t2i

    reference = build_karlo_variations(tmp_path / "variations")
    ours = t2i.load(tmp_path / "variations")
    source = noise_image()
    seed, steps = 4, 3
    ours.with_settings(super_res_steps=steps)
    expected = reference(source, decoder_num_inference_steps=steps, super_res_num_inference_steps=steps,
                         generator=torch.Generator("cpu").manual_seed(seed), decoder_guidance_scale=5.0,
                         output_type="np").images
    got = ours.variations(source, 1, seed=seed, steps=steps, guidance=5.0).sample * 0.5 + 0.5
    assert _relative(got, torch.from_numpy(expected).permute(0, 3, 1, 2)) < TOLERANCE
    with pytest.raises(ValueError, match="no prior"):
        ours.generate("a red circle", steps=2)  # an image-variation folder: init images only
    assert ours.generate("", init_image=source, seed=seed, steps=steps, guidance=5.0).images[0].size == (16, 16)


def noise_image():
    """A 40x48 RGB noise image (not square: CLIP's resize and centre crop are exercised)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
