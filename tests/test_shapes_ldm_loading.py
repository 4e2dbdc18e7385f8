"""The shapes family's loader against crafted files: a 2 KB file whose config asks for a huge network
is refused in one line before anything is allocated, and the shipped model still loads bit for bit."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from safetensors.torch import save_file

import t2i
from t2i.checkpoints.io import CheckpointError
from t2i.systems.shapes_ldm import ShapesLDM, preset_config, write_tiny_model


def _crafted(path, change) -> None:
    """The tiny model's real tensors under a config changed by `change`: only the config lies."""
    model = ShapesLDM(preset_config("tiny", "tiny"))
    cfg = model.cfg.to_dict()
    change(cfg)
    state = {f"{part}.{k}": v.contiguous() for part in ("vae", "unet")
             for k, v in getattr(model, part).state_dict().items()}
    save_file(state, str(path), metadata={"t2i_config": json.dumps(cfg), "t2i_system": "shapes_ldm"})


@pytest.mark.parametrize("change, message", [
    (lambda c: c["unet"].update(block_channels=[8192, 8192]), "unet"),
    (lambda c: c["vae"].update(layers_per_block=10_000_000), "vae"),
    (lambda c: c["schedule"].update(beta_end=float("nan")), "schedule"),
    (lambda c: c["unet"].update(no_such_field=1), "malformed"),
])
def test_crafted_configs_are_refused_before_allocating(tmp_path, change, message):
    path = tmp_path / "evil.safetensors"
    _crafted(path, change)
    t2i.load(write_tiny_model(tmp_path / "warm"))  # first-use imports are not what is measured
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises((CheckpointError, ValueError)) as e:
        ShapesLDM.load(path)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 150_000  # kB: no big allocation
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_tiny_model_round_trips_through_the_checked_loader(tmp_path):
    torch.manual_seed(0)
    path = write_tiny_model(tmp_path / "m")
    model = ShapesLDM.load(path)
    again = ShapesLDM.load(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                   strict=True))
    assert not any(t.is_meta for t in model.state_dict().values())


def test_a_crafted_autoencoder_file_is_refused_before_allocating(tmp_path):
    """`t2i train ldm --vae FILE` reads the same checked way: the tiny autoencoder's real tensors under a
    config asking for 8192 channels."""
    from t2i.autoencoders.kl import AutoencoderKL
    from t2i.systems.shapes_ldm import VAE_PRESETS
    from t2i.train.autoencoder import load_vae, save_vae

    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    save_vae(vae, tmp_path / "good.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(),
                                                   load_vae(tmp_path / "good.safetensors").state_dict().values(),
                                                   strict=True))
    cfg = {**vae.cfg.__dict__, "block_channels": [8192, 8192, 8192]}
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "evil.safetensors"),
              metadata={"t2i_config": json.dumps(cfg), "t2i_system": "autoencoder_kl"})
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(CheckpointError):
        load_vae(tmp_path / "evil.safetensors")
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 150_000
