"""unCLIP / DALL-E 2 (issue 20): the diffusion prior, the Karlo decoder and super-resolution U-Nets against
diffusers on tiny random weights, the whole UnCLIPPipeline from a folder, and the family's own uses."""

from __future__ import annotations

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


def build_karlo(folder):
    """A tiny random diffusers UnCLIPPipeline (Karlo's layout), saved to `folder`; returns the pipeline."""
    from sd_oracles import _clip, _tokenizer

    torch.manual_seed(0)
    e = 32  # CLIP width = projection = prior embedding, as Karlo's (768 each)
    text_encoder = _clip(e, 2, "gelu", 49407, projection=e)
    tokenizer = _tokenizer(folder / "tokenizer", "<|endoftext|>")
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, num_layers=2, embedding_dim=e,
                                       num_embeddings=77)
    _randomize(prior, 0.2)
    with torch.no_grad():
        prior.clip_std.abs_().add_(0.5)
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
    pipe = diffusers.UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder, tokenizer=tokenizer,
        super_res_first=super_res[0], super_res_last=super_res[1],
        prior_scheduler=scheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        decoder_scheduler=scheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=scheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
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
    from t2i.systems.unclip import load

    folder = tmp_path_factory.mktemp("karlo") / "karlo"
    reference = build_karlo(folder)
    return reference, load(folder), folder


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
