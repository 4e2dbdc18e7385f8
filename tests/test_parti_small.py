"""Parti's "parti-small" preset (t2i.systems.parti.PRESETS): a model small enough to ship, at most 5 MB in fp16
with its tokenizer, chosen when `t2i train parti --preset parti-small` names no decoder shape."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2i.autoencoders.tokenizers import KINDS, build_tokenizer
from t2i.systems.parti import save_parti
from t2i.train.parti import PartiTrainConfig, resolve_model_config

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 5_000_000  # bytes: a shipped family model, fp16, tokenizer included


def _fp16_file_size(preset: str, tokenizer: str, tmp_path) -> int:
    """The model file of a new run of `preset` on the `tokenizer` kind's f8 preset, every tensor in fp16."""
    vq = build_tokenizer(KINDS[tokenizer].presets["f8"])
    cfg = resolve_model_config(PartiTrainConfig(out="", preset=preset), vq.cfg)
    save_parti(cfg.network(), vq, cfg, tmp_path / "fp32.safetensors")
    half = {k: v.half() for k, v in load_file(tmp_path / "fp32.safetensors").items()}
    save_file(half, tmp_path / "fp16.safetensors")
    return (tmp_path / "fp16.safetensors").stat().st_size


def test_parti_small_ships_within_5_mb_in_fp16_with_its_tokenizer(tmp_path):
    size = _fp16_file_size("parti-small", "vit-vqgan", tmp_path)
    print(f"parti-small on the ViT-VQGAN f8 tokenizer: {size / 1e6:.2f} MB in fp16")
    assert size <= LIMIT
    assert _fp16_file_size("parti", "vit-vqgan", tmp_path) > LIMIT  # the default preset does not fit


def test_the_preset_gives_the_decoder_shape_unless_the_run_names_one():
    vq = KINDS["vit-vqgan"].presets["f8"]
    small = resolve_model_config(PartiTrainConfig(out="", preset="parti-small"), vq)
    assert (small.net.width, small.net.layers, small.net.grid, small.text_encoder) == (96, 3, 8, "minilm")
    assert small.preset == "parti-small" and small.net.causal and small.net.context_dim == 384
    named = resolve_model_config(PartiTrainConfig(out="", preset="parti-small", net_preset="shapes"), vq)
    assert named.net.width == 192
    assert resolve_model_config(PartiTrainConfig(out="", preset="parti"), vq).net.width == 192  # as before
    with pytest.raises(ValueError, match="unknown Parti preset"):
        resolve_model_config(PartiTrainConfig(out="", preset="parti-large"), vq)


def test_a_parti_small_model_generates(tmp_path):
    """The preset's network draws a token map through the pipeline (random weights, greedy: different prompts,
    different maps)."""
    from test_ddpm import _Words

    from t2i.systems.parti import PartiPipeline
    from t2i.systems.token_models import tiny_tokenizer

    vq = tiny_tokenizer()
    cfg = resolve_model_config(PartiTrainConfig(out="", preset="parti-small"), vq.cfg)
    torch.manual_seed(0)
    net = cfg.network().eval()
    with torch.no_grad():
        net.to_logits.weight.normal_(0, net.cfg.width ** -0.5)
    pipe = PartiPipeline(net, vq, cfg, minilm=_Words(384))
    a, b = (pipe.generate(p, seed=0, sampler="greedy").sample for p in ("a red circle", "a blue square"))
    assert a.shape == (1, 16) and not torch.equal(a, b)


def test_the_cli_trains_the_preset_with_its_own_decoder(tmp_path, monkeypatch):
    """`t2i train parti --preset parti-small` without --net-preset: the exported model has the small decoder."""
    from test_ddpm import _Words

    import t2i
    from t2i.cli import main
    from t2i.systems import parti
    from t2i.systems.token_models import tiny_tokenizer
    from t2i.train import parti as train_module
    from t2i.train.vqvae import save_vqvae

    for module in (parti, train_module):  # MiniLM: a stand-in, no load
        monkeypatch.setattr(module, "load_text_encoder", lambda name, length: _Words(384))
    save_vqvae(tiny_tokenizer(), tmp_path / "vqvae.safetensors")
    args = ["--vqvae", str(tmp_path / "vqvae.safetensors"), "--out", str(tmp_path / "run"), "--steps", "2",
            "--batch-size", "4", "--image-every", "0", "--threads", "1"]
    assert main(["train", "parti", "--preset", "parti-small", *args]) == 0
    pipe = t2i.load(tmp_path / "run" / "model.safetensors")
    assert pipe.cfg.preset == "parti-small" and (pipe.unet.cfg.width, pipe.unet.cfg.layers) == (96, 3)
