"""`t2i train deepfloyd-if`: both stages of the cascade train on the shapes world with the one loop (tiny presets,
16x16 base, 16 -> 32 super-resolution with noise augmentation), their exports load as one cascade, and an
interrupted stage-II run resumed with --resume ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ddpm import _Words

import t2i
from t2i.checkpoints.io import load_state_dict
from t2i.diffusion.losses import HybridLoss
from t2i.systems.deepfloyd_if import LowResInput, combine_stages, read_if_file
from t2i.train.data import open_data
from t2i.train.deepfloyd_if import IFTrainConfig, train_if
from t2i.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")


class _Text(_Words):
    """The stand-in word encoder, as wide as MiniLM (the exported file names MiniLM, which `t2i.load` reads)."""

    context_dim = 384

    def __init__(self) -> None:
        super().__init__(384)


COMMON = dict(image_size=16, batch_size=8, lr=3e-3, warmup=5, ckpt_every=1000, image_every=0, log_every=5, seed=0,
              ema_decay=0.0)


def _held_out_loss(path, stage: str, text) -> float:
    """L_simple of the file's `stage` network on 16 held-out scenes (sr: area-downsampled, upsampled, noised
    at level 100), averaged over 4 draws of t and noise."""
    cfg, base, sr = read_if_file(path)
    net = base if stage == "base" else sr
    size = net.cfg.sample_size
    x, captions, _ = open_data("shapes", None, size, 123, print).batch(0, 16, DistInfo())
    cond = {"context": text.encode(captions).context}
    model = net
    if stage == "sr":
        up = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="area"), (size, size), mode="bilinear",
                           align_corners=True)
        cond["low_res"], cond["noise_level"] = up, torch.full((16,), 100)
        model = LowResInput(net)
    schedule = cfg.stage_schedule(stage)
    loss = HybridLoss(schedule.alphas_cumprod(), schedule.prediction_type)
    with torch.no_grad():
        return sum(loss.terms(model, x, cond, torch.Generator().manual_seed(k))[0].mean().item() for k in range(4)) / 4


def test_both_stages_lower_their_loss_and_export_one_cascade(tmp_path):
    """20 steps each (about 15 s together): the base stage's and the super-resolution stage's held-out eps
    losses fall well below their untrained networks'; the sr export holds the base it was given and
    generates 32x32 images through `t2i.load`."""
    text = _Text()
    runs = {}
    for stage, steps in (("base", 1), ("base", 20)):
        out = tmp_path / f"{stage}{steps}"
        lr = 1e-12 if steps == 1 else COMMON["lr"]
        assert train_if(IFTrainConfig(out=str(out), stage=stage, preset="tiny_base", steps=steps,
                                      **{**COMMON, "lr": lr}), text_encoder=text) == 0
        runs[f"{stage}{steps}"] = out / "model.safetensors"
    base = runs["base20"]
    for steps in (1, 20):
        out = tmp_path / f"sr{steps}"
        lr = 1e-12 if steps == 1 else COMMON["lr"]
        assert train_if(IFTrainConfig(out=str(out), stage="sr", preset="tiny_sr", base_from=str(base), steps=steps,
                                      **{**COMMON, "lr": lr}), text_encoder=text) == 0
        runs[f"sr{steps}"] = out / "model.safetensors"
    for stage in ("base", "sr"):
        before, after = (_held_out_loss(runs[f"{stage}{n}"], stage, text) for n in (1, 20))
        print(f"IF {stage}: held-out eps loss {before:.4f} -> {after:.4f}")
        assert after < 0.7 * before
    cascade = t2i.load(runs["sr20"])
    assert cascade.sr is not None and cascade.capabilities.native_size == (32, 32)
    assert cascade.generate("a red circle", seed=0, steps=2).images[0].size == (32, 32)
    trained_base = load_state_dict(base)
    exported = load_state_dict(runs["sr20"])
    assert all(torch.equal(v, trained_base[k]) for k, v in exported.items() if k.startswith("base."))
    assert "if/vlb_bpd" in (tmp_path / "sr20" / "log.txt").read_text()
    # stages trained side by side combine into one cascade: here the 1-step base with the trained stage II
    combined = combine_stages(runs["base1"], runs["sr20"], tmp_path / "combined.safetensors")
    state, other_base = load_state_dict(combined), load_state_dict(runs["base1"])
    assert all(torch.equal(v, other_base[k] if k.startswith("base.") else exported[k]) for k, v in state.items())
    assert not torch.equal(other_base["base.conv_out.weight"], trained_base["base.conv_out.weight"])
    assert t2i.load(combined).sr is not None


def test_a_v_prediction_base_learns_and_each_stage_keeps_its_parameterisation(tmp_path):
    """`--prediction v_prediction` for stage I (what learns from the cosine schedule's nearly pure noise, as the
    pixel DDPM and GLIDE runs found) next to IF's eps stage II: the v base's held-out loss falls, and every way
    of putting the two together (sr --base-from, base --sr-from, combine_stages) keeps each stage's own
    parameterisation in the file and in the pipeline."""
    text = _Text()
    files = {}
    for name, steps, lr in (("v1", 1, 1e-12), ("v20", 20, COMMON["lr"])):
        out = tmp_path / name
        assert train_if(IFTrainConfig(out=str(out), stage="base", preset="tiny_base", steps=steps,
                                      prediction_type="v_prediction", **{**COMMON, "lr": lr}), text_encoder=text) == 0
        files[name] = out / "model.safetensors"
    before, after = (_held_out_loss(files[n], "base", text) for n in ("v1", "v20"))
    print(f"IF v base: held-out v loss {before:.4f} -> {after:.4f}")  # 1.061 -> 0.690 measured
    assert after < 0.8 * before
    assert train_if(IFTrainConfig(out=str(tmp_path / "sr"), stage="sr", preset="tiny_sr", base_from=str(files["v20"]),
                                  steps=2, **COMMON), text_encoder=text) == 0
    assert train_if(IFTrainConfig(out=str(tmp_path / "again"), stage="base", preset="tiny_base", steps=2,
                                  prediction_type="v_prediction", sr_from=str(tmp_path / "sr" / "model.safetensors"),
                                  **COMMON), text_encoder=text) == 0
    eps_base = t2i.systems.registry.system("deepfloyd_if").write_tiny(tmp_path / "tiny", 0)  # eps throughout
    combined = combine_stages(files["v20"], eps_base, tmp_path / "combined.safetensors")
    for path in (tmp_path / "sr" / "model.safetensors", tmp_path / "again" / "model.safetensors", combined):
        cfg, _, _ = read_if_file(path)
        assert (cfg.schedule.prediction_type, cfg.stage_schedule("sr").prediction_type) == ("v_prediction", "epsilon")
        pipe = t2i.load(path)
        assert (pipe.base.schedule.prediction_type, pipe.sr.schedule.prediction_type) == ("v_prediction", "epsilon")
        assert pipe.generate("a red circle", seed=0, steps=2).images[0].size == (32, 32)
    with pytest.raises(ValueError, match="prediction type"):
        train_if(IFTrainConfig(out=str(tmp_path / "bad"), stage="base", preset="tiny_base", steps=1,
                               prediction_type="x0", **COMMON), text_encoder=text)


def test_a_resumed_sr_run_equals_an_uninterrupted_one(tmp_path):
    text = _Text()
    base = t2i.systems.registry.system("deepfloyd_if").write_tiny(tmp_path / "tiny", 0)
    common = {**COMMON, "ckpt_every": 2, "ema_decay": 0.9}

    def run(out, steps, resume=False):
        return train_if(IFTrainConfig(out=str(out), stage="sr", preset="tiny_sr", base_from=str(base), steps=steps,
                                      **common), resume=resume, text_encoder=text)

    assert run(tmp_path / "straight", 4) == 0
    assert run(tmp_path / "parts", 2) == 0
    assert run(tmp_path / "parts", 4, resume=True) == 0
    a, b = (load_state_dict(tmp_path / r / "model.safetensors") for r in ("straight", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="base-from"):
        train_if(IFTrainConfig(out=str(tmp_path / "no"), stage="sr", preset="tiny_sr", steps=1), text_encoder=text)
