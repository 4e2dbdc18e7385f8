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
