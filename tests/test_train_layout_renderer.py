"""`t2i train layout-renderer` (issue 17): a tiny run on another autoencoder (`--vae`) ships that
autoencoder with its measured latent scale, and a killed run resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from t2i.autoencoders.kl import AutoencoderKL
from t2i.systems.shapes_layout import ShapesLayoutModel
from t2i.systems.shapes_ldm import VAE_PRESETS, ShapesLDM, preset_config
from t2i.train.autoencoder import load_vae, save_vae
from t2i.train.checkpoint import latest_checkpoint
from t2i.train.layout_ldm import LayoutLDMTrainConfig, layout_latent_scale, train_layout_ldm


def _files(tmp_path) -> tuple[str, str]:
    torch.manual_seed(0)
    ShapesLDM(preset_config("tiny", "tiny")).save(tmp_path / "init.safetensors")
    torch.manual_seed(1)
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    with torch.no_grad():  # a latent space clearly not the init's, nor unit-scaled
        vae.quant_conv.weight.mul_(3.0)
    save_vae(vae, tmp_path / "vae.safetensors")
    return str(tmp_path / "init.safetensors"), str(tmp_path / "vae.safetensors")


def _cfg(out, init: str, vae: str, steps: int, **more) -> LayoutLDMTrainConfig:
    return LayoutLDMTrainConfig(out=str(out), init_from=init, vae=vae, steps=steps, batch_size=4, lr=1e-3,
                                warmup=1, ckpt_every=2, export_every=2, image_every=0, log_every=1, seed=3,
                                recaption=True, threads=1, **more)


def test_a_renderer_run_on_another_autoencoder_ships_it_with_its_measured_scale(tmp_path):
    init, vae_file = _files(tmp_path)
    assert train_layout_ldm(_cfg(tmp_path / "run", init, vae_file, 2)) == 0
    shipped = ShapesLayoutModel.load(tmp_path / "run" / "model.safetensors")
    new_vae = load_vae(vae_file)
    torch.testing.assert_close(shipped.vae.state_dict(), new_vae.state_dict(), rtol=0, atol=0)
    scale = layout_latent_scale(new_vae, seed=3, background_p=_cfg("", "", "", 0).background_p)
    assert shipped.cfg.ldm.vae.scaling_factor == scale
    assert abs(scale - 1.0) > 0.05  # measured, not the file's own 1.0
    assert ShapesLDM.load(init).cfg.vae.scaling_factor == 1.0


@pytest.mark.parametrize("change, message", [({"latent_channels": 8}, "8 latent channels"),
                                             ({"block_channels": (8, 16, 16, 16)}, "factor 8")])
def test_a_renderer_run_on_an_autoencoder_of_another_shape_is_refused(tmp_path, change, message):
    init, _ = _files(tmp_path)
    cfg = dict(VAE_PRESETS["tiny"].__dict__, **change)
    save_vae(AutoencoderKL(type(VAE_PRESETS["tiny"])(**cfg)), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=message):
        train_layout_ldm(_cfg(tmp_path / "bad", init, str(tmp_path / "other.safetensors"), 1))


def test_a_killed_renderer_run_with_the_pixel_loss_resumes_to_the_uninterrupted_weights(tmp_path):
    init, vae_file = _files(tmp_path)
    pixel = {"pixel_weight": 1.0, "pixel_batch": 2}
    assert train_layout_ldm(_cfg(tmp_path / "whole", init, vae_file, 4, **pixel)) == 0
    assert train_layout_ldm(_cfg(tmp_path / "parts", init, vae_file, 2, **pixel)) == 0
    assert train_layout_ldm(_cfg(tmp_path / "parts", init, vae_file, 4, **pixel), resume=True,
                            given={"steps": "--steps"}) == 0
    assert "resumed from" in (tmp_path / "parts" / "log.txt").read_text()
    whole = load_file(latest_checkpoint(tmp_path / "whole"))
    parts = load_file(latest_checkpoint(tmp_path / "parts"))
    assert latest_checkpoint(tmp_path / "parts").name == "step_00000004.safetensors"
    for k in whole:
        if k.startswith(("unet.", "ema.")):
            torch.testing.assert_close(parts[k], whole[k], rtol=0, atol=0, msg=k)


def test_a_resume_whose_autoencoder_file_changed_is_refused_by_name(tmp_path):
    init, vae_file = _files(tmp_path)
    assert train_layout_ldm(_cfg(tmp_path / "run", init, vae_file, 2)) == 0
    vae = load_vae(vae_file)
    with torch.no_grad():
        vae.quant_conv.weight.mul_(2.0)
    save_vae(vae, vae_file)  # the same path, another latent space
    with pytest.raises(ValueError, match="vae.safetensors: its autoencoder is not the one this run started with"):
        train_layout_ldm(_cfg(tmp_path / "run", init, vae_file, 4), resume=True, given={"steps": "--steps"})
