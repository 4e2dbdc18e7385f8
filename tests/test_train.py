"""The training stack in-process: a tiny LDM and autoencoder learn (real loss drops), the
NaN guard stops with the step named and never writes a NaN checkpoint, checkpoints round-trip."""

from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import load_file

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.io import CheckpointError
from t2i.diffusion.losses import DiffusionLoss
from t2i.systems.shapes_ldm import VAE_PRESETS, ShapesLDM, ShapesLDMConfig
from t2i.text.encoders import TextEncoding
from t2i.train import ldm as ldm_mod
from t2i.train.autoencoder import AETrainConfig, load_vae, save_vae, train_autoencoder
from t2i.train.checkpoint import latest_checkpoint, load_checkpoint, read_metadata, save_checkpoint
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.ldm import LDMTrainConfig, train_ldm
from t2i.train.loop import NonFiniteLossError, batch_indices

torch.set_num_threads(1)


class HashText:
    """A stand-in for MiniLM: each word -> a fixed random 384-vector, zero-padded to 8 tokens."""

    max_length = 8

    def encode(self, prompts: list[str]) -> TextEncoding:
        ctx = torch.zeros(len(prompts), self.max_length, 384)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[: self.max_length]):
                g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
                ctx[i, j] = torch.randn(384, generator=g)
        return TextEncoding(ctx, None, None, [False] * len(prompts))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    with torch.no_grad():  # a near-deterministic posterior (as a trained VAE has): latents carry the image
        vae.quant_conv.bias[4:] = -12.0
    save_vae(vae, path)
    return str(path)


def _ldm_cfg(out, vae_file, **kw) -> LDMTrainConfig:
    base = dict(out=str(out), vae_path=vae_file, unet_preset="tiny", image_size=16, batch_size=8, steps=60,
                lr=2e-3, warmup=5, ckpt_every=1000, image_every=0, export_every=10_000, log_every=10)
    base.update(kw)
    return LDMTrainConfig(**base)


@torch.no_grad()
def _eval_loss(unet: torch.nn.Module, model_cfg: ShapesLDMConfig, vae_file: str) -> float:
    """The training objective on 64 fixed shapes images/captions, 4 fixed noise draws each."""
    vae = load_vae(vae_file)
    vae.cfg.scaling_factor = model_cfg.vae.scaling_factor
    data = open_data("shapes", None, 16, seed=123)
    x, captions, _ = data.batch(0, 64, DistInfo())
    z = vae.scale(vae.encode(x).sample(torch.Generator().manual_seed(0)))  # as in training
    ctx = HashText().encode(captions).context
    loss = DiffusionLoss(model_cfg.schedule.alphas_cumprod(), model_cfg.schedule.prediction_type, 5.0)
    return sum(loss(unet, z, {"context": ctx}, torch.Generator().manual_seed(k)).item() for k in range(4)) / 4


def test_tiny_ldm_run_lowers_its_loss(tmp_path, vae_file):
    cfg = _ldm_cfg(tmp_path / "run", vae_file)
    assert train_ldm(cfg, text_encoder=HashText()) == 0
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_00000060.safetensors"
    meta = read_metadata(ckpt)
    assert meta["step"] == 60 and meta["data_position"] == 60 * 8
    model_cfg = ShapesLDMConfig.from_dict(meta["config"]["model"])
    torch.manual_seed(cfg.seed)  # the run's initial weights, rebuilt the way train_ldm builds them
    before = _eval_loss(ShapesLDM(model_cfg).unet, model_cfg, vae_file)
    trained = ShapesLDM(model_cfg).unet
    trained.load_state_dict({k[5:]: v for k, v in load_file(ckpt).items() if k.startswith("unet.")})
    after = _eval_loss(trained, model_cfg, vae_file)
    print(f"eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before
    # the EMA export is a loadable, self-describing model
    shipped = ShapesLDM.load(tmp_path / "run" / "model.safetensors")
    assert shipped.cfg == model_cfg

    # A warm start from that file (how training continues on a machine that kept only the shipped
    # model): same config and autoencoder, and it starts from the file's U-Net, whose loss is the low one.
    warm_cfg = _ldm_cfg(tmp_path / "warm", "", init_from=str(tmp_path / "run" / "model.safetensors"), steps=1,
                        lr=1e-9, warmup=0, seed=1)
    assert train_ldm(warm_cfg, text_encoder=HashText()) == 0
    warm_ckpt = latest_checkpoint(tmp_path / "warm")
    assert ShapesLDMConfig.from_dict(read_metadata(warm_ckpt)["config"]["model"]) == model_cfg
    warm = ShapesLDM(model_cfg).unet
    warm.load_state_dict({k[5:]: v for k, v in load_file(warm_ckpt).items() if k.startswith("unet.")})
    torch.testing.assert_close(warm.state_dict(), shipped.unet.state_dict(), rtol=0, atol=1e-6)
    assert _eval_loss(warm, model_cfg, vae_file) < 0.8 * before


def test_tiny_autoencoder_run_lowers_reconstruction_error(tmp_path):
    torch.manual_seed(0)
    cfg = AETrainConfig(out=str(tmp_path / "ae"), vae=VAE_PRESETS["tiny"], image_size=16, steps=80, batch_size=8,
                        lr=2e-3, warmup=5, ckpt_every=1000, image_every=40, log_every=10)
    cfg.loss.disc_start = 60  # the adversarial part runs for the last 20 steps
    data = open_data("shapes", None, 16, seed=7)
    x, _, _ = data.batch(0, 32, DistInfo())
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        before = (AutoencoderKL(cfg.vae)(x, sample_posterior=False)[0] - x).abs().mean().item()
    assert train_autoencoder(cfg) == 0
    vae = load_vae(tmp_path / "ae" / "vae.safetensors")
    with torch.no_grad():
        after = (vae(x, sample_posterior=False)[0] - x).abs().mean().item()
    print(f"L1 before {before:.4f} after {after:.4f}")
    assert after < 0.7 * before
    assert (tmp_path / "ae" / "samples" / "recon_00000040.png").is_file()
    logged = (tmp_path / "ae" / "log.txt").read_text()
    assert "disc/loss" in logged and "ae/d_weight" in logged


def test_nan_loss_stops_with_step_named_and_no_nan_checkpoint(tmp_path, vae_file, monkeypatch):
    real_call = DiffusionLoss.__call__
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_call(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss  # the 4th step: index 3

    monkeypatch.setattr(ldm_mod.DiffusionLoss, "__call__", poisoned)
    cfg = _ldm_cfg(tmp_path / "run", vae_file, steps=10, ckpt_every=1, export_every=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 3\b"):
        train_ldm(cfg, text_encoder=HashText())
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000002.safetensors", "step_00000003.safetensors"]
    for p in ckpts:
        for t in load_file(p).values():
            assert torch.isfinite(t.float()).all()


def test_checkpoint_refuses_nan_weights_and_round_trips_optimizer(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, step=7, data_position=70, config={"a": 1}, modules={"m": net}, optimizers={"o": opt})
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=5.0)
    meta = load_checkpoint(path, modules={"m": net2}, optimizers={"o": opt2})
    assert meta["step"] == 7 and meta["data_position"] == 70 and meta["config"] == {"a": 1}
    assert torch.equal(net2.weight, net.weight) and opt2.param_groups[0]["lr"] == 1e-3
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[net2.weight][k], opt.state[net.weight][k])
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(tmp_path / "bad.safetensors", step=8, data_position=80, config={},
                        modules={"m": net}, optimizers={"o": opt})
    assert not (tmp_path / "bad.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_ranks_read_disjoint_slices_and_epochs_are_permutations():
    a = batch_indices(100, 4, DistInfo(0, 2, 0))
    b = batch_indices(100, 4, DistInfo(1, 2, 0))
    assert a == [100, 101, 102, 103] and b == [104, 105, 106, 107]
    epoch = [i for pos in range(0, 10, 5) for i in batch_indices(pos, 5, DistInfo(), length=10, seed=3)]
    assert sorted(epoch) == list(range(10)) and epoch != list(range(10))
    assert batch_indices(10, 5, DistInfo(), length=10, seed=3) != epoch[:5]  # a new order each epoch


def test_train_ldm_needs_a_vae_or_a_model_to_start_from(tmp_path, capsys):
    from t2i.cli import main

    assert main(["train", "ldm", "--out", str(tmp_path / "r")]) != 0
    assert "exactly one of --vae" in capsys.readouterr().err
