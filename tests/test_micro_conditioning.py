"""SDXL-style training of the shapes LDM: micro-conditioning reaches the U-Net, bucketed training
runs on non-square batches, the timestep range is respected, and a bucket-trained model generates
a non-square canvas end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from test_train import HashText, vae_file  # noqa: F401  (the module's tiny VAE fixture)

from t2i.diffusion.losses import DiffusionLoss
from t2i.nets.unet import UNet
from t2i.systems.shapes_ldm import UNET_PRESETS, ShapesLDM
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.ldm import LDMTrainConfig, shifted_timesteps, train_ldm, uncropped_time_ids

torch.set_num_threads(1)


def _unet(projection: int) -> UNet:
    torch.manual_seed(0)
    cfg = dataclasses.replace(UNET_PRESETS["tiny"], context_dim=8, addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=projection)
    return UNet(cfg).eval()


@torch.no_grad()
def test_crop_and_size_ids_change_the_output_without_pooled_text():
    unet = _unet(6 * 8)
    x, ctx = torch.randn(2, 4, 6, 10), torch.randn(2, 3, 8)
    t = torch.tensor([10.0, 500.0])
    ids = torch.tensor([[24.0, 40.0, 0.0, 0.0, 24.0, 40.0]]).expand(2, 6)
    cropped = ids.clone()
    cropped[:, 2:4] = torch.tensor([6.0, 9.0])
    a, b = unet(x, t, ctx, time_ids=ids), unet(x, t, ctx, time_ids=cropped)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    with pytest.raises(ValueError, match="time_ids"):
        unet(x, t, ctx)
    # SDXL's layout (pooled text + ids) still demands text_embeds
    with pytest.raises(ValueError, match="text_embeds"):
        _unet(5 + 6 * 8)(x, t, ctx, time_ids=ids)


@torch.no_grad()
def test_sampling_default_is_uncropped_canvas():
    unet = _unet(6 * 8)
    x, ctx, t = torch.randn(1, 4, 6, 10), torch.randn(1, 3, 8), torch.tensor([10.0])
    hook = unet.register_forward_pre_hook(lambda m, a, k: uncropped_time_ids(m, a, k, factor=4), with_kwargs=True)
    try:
        hooked = unet(x, t, ctx)
    finally:
        hook.remove()
    assert torch.equal(hooked, unet(x, t, ctx, time_ids=torch.tensor([[24.0, 40.0, 0.0, 0.0, 24.0, 40.0]])))


def test_timestep_range_is_respected():
    seen = []

    def net(x, t, **cond):
        seen.append(t.clone())
        return torch.zeros_like(x)

    acp = torch.linspace(0.999, 0.01, 1000)
    loss = DiffusionLoss(acp[700:900], "epsilon")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        loss(shifted_timesteps(net, 700), torch.randn(16, 4, 2, 2), None, g)
    t = torch.cat(seen)
    assert t.min() >= 700 and t.max() < 900 and t.max() - t.min() > 150


def _cfg(out, vae_path, **kw) -> LDMTrainConfig:
    base = dict(out=str(out), vae_path=vae_path, unet_preset="tiny", image_size=32, batch_size=4, steps=3,
                lr=1e-3, warmup=1, ckpt_every=1000, image_every=0, export_every=10_000, log_every=1,
                aspect_buckets=True, micro_conditioning=True, timestep_range=(0, 200))
    base.update(kw)
    return LDMTrainConfig(**base)


def test_bucketed_micro_conditioned_training_and_non_square_generation(tmp_path, vae_file):  # noqa: F811
    cfg = _cfg(tmp_path / "run", vae_file, crop_zoom=(0.5, 1.6))  # SDXL's random crops of enlarged images too
    data = open_data("shapes", None, 32, cfg.seed, size_multiple=8)
    shapes = {tuple(data.batch(4 * k, 4, DistInfo())[0].shape[2:]) for k in range(cfg.steps)}
    assert any(h != w for h, w in shapes)  # the run's steps include non-square batches
    assert train_ldm(cfg, text_encoder=HashText()) == 0
    model = ShapesLDM.load(tmp_path / "run" / "model.safetensors")
    assert model.unet.add_embedding is not None and model.unet.cfg.projection_class_embeddings_input_dim == 6 * 64
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "nan" not in log.lower()


@pytest.mark.parametrize("micro", [False, True])
def test_bucket_trained_model_generates_80x48_end_to_end(tmp_path, vae_file, micro):  # noqa: F811
    from t2i.cli import main

    cfg = _cfg(tmp_path / "run", vae_file, micro_conditioning=micro, timestep_range=None, steps=2)
    assert train_ldm(cfg, text_encoder=HashText()) == 0
    out = tmp_path / "wide.png"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "run" / "model.safetensors"), "--steps", "2",
                 "--width", "80", "--height", "48", "--out", str(out), "--quiet", "--seed", "0"]) == 0
    assert Image.open(out).size == (80, 48)


def test_micro_conditioning_needs_buckets(tmp_path, vae_file):  # noqa: F811
    with pytest.raises(ValueError, match="aspect-buckets"):
        train_ldm(_cfg(tmp_path / "run", vae_file, aspect_buckets=False), text_encoder=HashText())
    plain = _cfg(tmp_path / "plain", vae_file, micro_conditioning=False, timestep_range=None, steps=1)
    assert train_ldm(plain, text_encoder=HashText()) == 0
    with pytest.raises(ValueError, match="one of"):
        train_ldm(_cfg(tmp_path / "run2", vae_file, center_crop=True), text_encoder=HashText())
    with pytest.raises(ValueError, match="crop-zoom.*aspect-buckets"):
        train_ldm(_cfg(tmp_path / "run3", vae_file, aspect_buckets=False, micro_conditioning=False,
                       crop_zoom=(0.5, 1.6)), text_encoder=HashText())


def test_micro_conditioning_warm_start_begins_at_the_init(tmp_path, vae_file):  # noqa: F811
    """--init-from a model without micro-conditioning + --micro-conditioning: the added embedding is new and
    zero at its output, so the warm-started U-Net predicts exactly what the init does, whatever the ids."""
    from t2i.train.ldm import load_warm_start, with_micro_conditioning

    plain = _cfg(tmp_path / "plain", vae_file, micro_conditioning=False, timestep_range=None, steps=1)
    assert train_ldm(plain, text_encoder=HashText()) == 0
    init = ShapesLDM.load(tmp_path / "plain" / "model.safetensors")
    torch.manual_seed(1)
    unet = UNet(with_micro_conditioning(ShapesLDM.load(tmp_path / "plain" / "model.safetensors").cfg).unet).eval()
    load_warm_start(unet, init.unet)
    x, t = torch.randn(2, 4, 4, 6), torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 3, init.unet.cfg.context_dim)
    ids = torch.tensor([[16.0, 24.0, 4.0, 6.0, 16.0, 24.0]]).expand(2, 6)
    with torch.no_grad():
        want = init.unet(x, t, ctx)
        assert torch.equal(unet(x, t, ctx, time_ids=ids), want)
    # the added embedding is trainable from there: its first layer gets a gradient once the output layer moves
    assert unet.add_embedding.linear_2.weight.abs().sum() == 0 and unet.add_embedding.linear_1.weight.std() > 0
    # and the training run itself starts from it, micro-conditioned, with buckets
    warm = _cfg(tmp_path / "warm", "", init_from=str(tmp_path / "plain" / "model.safetensors"), timestep_range=None)
    assert train_ldm(warm, text_encoder=HashText()) == 0
    assert ShapesLDM.load(tmp_path / "warm" / "model.safetensors").unet.add_embedding is not None
