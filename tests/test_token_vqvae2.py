"""VQ-VAE-2 in the token families (issue 19): MaskGIT reads the two grids as one token sequence (top
grid, then bottom, each position its own learned embedding), masks and decodes them together, and
decodes through the VQ-VAE-2's decoder; the other token families refuse one by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_ddpm import _Words
from test_maskgit import held_out_losses

from t2i.autoencoders.tokenizers import KINDS, build_tokenizer, decode_tokens, round_trip, save_tokenizer
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformer, TokenTransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(path):
    """A tiny random VQ-VAE-2 (16x16 images: a 2x2 top grid of 16 codes over a 4x4 bottom of 32) saved at path."""
    torch.manual_seed(0)
    vq = build_tokenizer(dataclasses.replace(KINDS["vqvae2"].presets["tiny"])).eval()
    with torch.no_grad():
        vq.quantize.codebook.normal_()
        vq.quantize_top.codebook.normal_()
    save_tokenizer(vq, path)
    return vq


def test_a_maskgit_on_a_vqvae2_trains_and_generates_both_grids_decoded_by_its_decoder(tmp_path):
    """40 steps on the tiny VQ-VAE-2: the held-out masked-token loss falls from log(48) (the 16 top + 32
    bottom codes); the model writes 20 tokens, each grid from its own codebook, decoded to a 16x16 image
    by the VQ-VAE-2's decoder, through the registry and both samplers."""
    import numpy as np

    import t2i
    from t2i.systems.maskgit import MaskGITPipeline

    vq = _tokenizer(tmp_path / "v2.safetensors")
    text = _Words(384)
    with torch.no_grad():  # the sequence the network learns: 4 top tokens of 16 codes, then 16 bottom ones of 32
        codes = vq.encode(torch.rand(2, 3, 16, 16) * 2 - 1)[0]
    assert codes.shape == (2, 20) and (codes[:, :4] < 16).all() and (codes[:, 4:] >= 16).all()
    before, after = held_out_losses(tmp_path / "v2.safetensors", tmp_path, text)  # measured 3.87 -> 0.91
    assert before == pytest.approx(np.log(48), abs=1e-3) and after < 0.75 * before

    pipe = t2i.load(tmp_path / "r40" / "model.safetensors")
    pipe.text_encoder = text
    assert isinstance(pipe, MaskGITPipeline) and pipe.unet.cfg.top_grid == 2 and pipe.unet.cfg.num_tokens == 20
    for sampler in ("maskgit", "raster"):
        result = pipe.generate("a red circle", seed=1, sampler=sampler, temperature=3.0)  # hot: every code likely
        codes = result.sample
        assert codes.shape == (1, 20) and result.images[0].size == (16, 16)
        assert (codes[:, :4] < 16).all() and (codes[:, 4:] >= 16).all() and (codes < 48).all(), sampler
        with torch.no_grad():
            want = vq.decode_codes(codes, 16, 16)[0].clamp(-1, 1)
        got = torch.from_numpy(np.asarray(result.images[0], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert (got - want).abs().max() < 1 / 127.5 + 1e-6


def test_two_maps_embed_every_position_and_old_configs_read_as_one_map():
    """top_grid adds top_grid ** 2 learned positions before the map's (no other parameter, so a file
    written before the field has the same tensors and reads as top_grid 0); only full attention."""
    tiny = dataclasses.replace(TOKEN_TRANSFORMER_PRESETS["tiny"])
    two = dataclasses.replace(tiny, top_grid=2)
    assert two.num_tokens == 20 and tiny.num_tokens == 16
    a, b = TokenTransformer(tiny), TokenTransformer(two)
    assert {k: v.shape for k, v in a.state_dict().items() if k != "position"} == {
        k: v.shape for k, v in b.state_dict().items() if k != "position"}
    assert b.position.shape == (1, 20, 32)
    old = {k: v for k, v in dataclasses.asdict(tiny).items() if k != "top_grid"}
    assert TokenTransformerConfig(**old) == tiny
    with torch.no_grad():
        b.to_logits.weight.normal_()
        tokens = torch.randint(0, 32, (2, 20))
        context = torch.randn(2, 3, 384)
        out = b(tokens, context=context)
        moved = tokens.clone()
        moved[:, 0] = (moved[:, 0] + 1) % 32  # a top token changes the bottom's logits: one sequence
        assert out.shape == (2, 20, 32) and not torch.allclose(out[:, 4:], b(moved, context=context)[:, 4:])
    with pytest.raises(ValueError, match="full attention"):
        dataclasses.replace(tiny, top_grid=2, attention="row")


def test_decode_tokens_and_allowed_codes_follow_the_two_grids(tmp_path):
    from t2i.autoencoders.tokenizers import allowed_codes

    vq = _tokenizer(tmp_path / "v2.safetensors")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        seq = vq.encode(x)[0]
        assert torch.equal(decode_tokens(vq, seq, 16, 16), vq.decode_levels(*vq.encode_levels(x)))
        assert torch.equal(round_trip(vq, x), decode_tokens(vq, seq, 16, 16))
    allowed = allowed_codes(vq.cfg, 16, 16)
    assert allowed.shape == (20, 48) and allowed[:4, :16].all() and not allowed[:4, 16:].any()
    assert allowed[4:, 16:].all() and not allowed[4:, :16].any()
    assert allowed_codes(KINDS["vqvae"].presets["tiny"], 16, 16) is None


@pytest.mark.parametrize("family", ["dalle", "parti"])
def test_the_other_token_families_refuse_a_vqvae2_by_name(family, tmp_path, capsys):
    from t2i.cli import main

    _tokenizer(tmp_path / "v2.safetensors")
    assert main(["train", family, "--vqvae", str(tmp_path / "v2.safetensors"), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "VQ-VAE-2" in err and "only maskgit" in err


def test_a_muse_file_refuses_a_vqvae2_and_a_maskgit_config_must_match_its_tokenizer():
    from t2i.autoencoders.vqvae2 import VQVAE2_CONFIGS
    from t2i.systems.maskgit import MaskGITConfig
    from t2i.systems.muse import MuseConfig, tiny_config

    v2 = dataclasses.asdict(VQVAE2_CONFIGS["tiny"])
    muse = {**dataclasses.asdict(tiny_config(KINDS["vqvae"].presets["tiny"])), "vq": v2}
    with pytest.raises(ValueError, match="VQ-VAE-2"):
        MuseConfig.from_dict(muse)
    one_map = dataclasses.asdict(MaskGITConfig(net=dataclasses.replace(TOKEN_TRANSFORMER_PRESETS["tiny"])))
    with pytest.raises(ValueError, match="not the tokenizer's"):
        MaskGITConfig.from_dict({**one_map, "vq": v2})  # a one-map transformer on two grids
    two = MaskGITConfig.from_dict({**one_map, "vq": v2, "net": {**one_map["net"], "top_grid": 2}})
    assert two.net.num_tokens == 20
