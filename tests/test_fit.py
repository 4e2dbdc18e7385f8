"""The one training loop (`t2i.train.fit`) with a toy family, so each guarantee is tested once for every
family: exact resume (also after SIGINT/SIGTERM), the NaN stop naming the step, a corrupt newest
checkpoint passed over for the newest intact one, a resumed run keeping its saved settings unless an
option is given explicitly, and sample grids that carry their captions. The toy step owns two optimizers
(as the autoencoder's GAN step does), an EMA, and draws from both the step generator and the global RNG."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from t2i.checkpoints.io import CheckpointError
from t2i.train.checkpoint import checkpoint_path, read_metadata, verify_checkpoint
from t2i.train.config import LoopConfig
from t2i.train.ema import EMA
from t2i.train.fit import Grid, Run, Step, Task, fit
from t2i.train.loop import CAPTION_CELL, NonFiniteLossError, save_grid

torch.set_num_threads(1)


@dataclass
class ToyConfig(LoopConfig):
    width: int = 4
    steps: int = 6
    batch_size: int = 4
    lr: float = 0.05
    warmup: int = 2
    log_every: int = 1
    image_every: int = 0
    ckpt_every: int = 2
    keep: int = 10
    poison_at: int = -1  # the step whose loss is NaN
    signal_at: int = -1  # the step during which the process signals itself
    signum: int = int(signal.SIGTERM)


def build_toy(cfg: ToyConfig, run: Run) -> Task:
    net, critic = nn.Linear(cfg.width, 1), nn.Linear(1, 1)
    ema = EMA(net, 0.9)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    opt_critic = torch.optim.AdamW(critic.parameters(), lr=cfg.lr)
    w_true = torch.arange(1.0, cfg.width + 1)

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(cfg.batch_size, cfg.width, generator=torch.Generator().manual_seed(position))
        return x, x @ w_true + 0.1 * torch.randn(cfg.batch_size, generator=gen)

    def step(batch: tuple[torch.Tensor, torch.Tensor], s: Step) -> dict[str, float]:
        x, y = batch
        if s.index == cfg.signal_at:
            os.kill(os.getpid(), cfg.signum)
        pred = run.parallel(net)(x).squeeze(-1)
        jitter = 1 + 0.01 * torch.rand(()) + 0.01 * torch.rand((), generator=s.generator)  # global + step RNG
        loss = (pred - y).pow(2).mean() * jitter
        if s.index == cfg.poison_at:
            loss = loss * float("nan")
        gnorm = s.update(loss, opt, net.parameters())
        critic_loss = (critic(pred.detach()[:, None]).squeeze(-1) - y).pow(2).mean()
        s.update(critic_loss, opt_critic, None, "critic loss")
        return {"toy/loss": loss.item(), "toy/grad_norm": gnorm, "toy/critic": critic_loss.item()}

    return Task("toy", {"net": net, "critic": critic, "ema": ema.averaged}, {"opt": opt, "critic": opt_critic},
                prepare=prepare, step=step, ema=ema)


def _ckpt(run: Path, step: int) -> dict[str, torch.Tensor]:
    # copies: load_file maps the file, and some tests overwrite it afterwards
    return {k: v.clone() for k, v in load_file(checkpoint_path(run, step)).items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.critic.") for k in a) and any(k.startswith("ema.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6)."""
    out = tmp_path_factory.mktemp("straight")
    assert fit(ToyConfig(out=str(out)), build_toy) == 0
    return out


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, straight):
    assert fit(ToyConfig(out=str(tmp_path), steps=3), build_toy) == 0
    assert fit(ToyConfig(out=str(tmp_path), steps=6), build_toy, resume=True) == 0
    _assert_bitwise(_ckpt(straight, 6), _ckpt(tmp_path, 6))
    assert not torch.equal(_ckpt(straight, 2)["net.weight"], _ckpt(straight, 6)["net.weight"])  # it trains
    assert "resumed from" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_stops_and_resumes_exactly(tmp_path, straight, signum):
    cfg = ToyConfig(out=str(tmp_path), signal_at=2, signum=int(signum))
    assert fit(cfg, build_toy) == 128 + signum  # as a shell reports a job killed by that signal
    meta = read_metadata(checkpoint_path(tmp_path, 3))  # the step under way finished, then saved
    assert meta["step"] == 3 and meta["data_position"] == 3 * 4
    assert not checkpoint_path(tmp_path, 4).exists()
    assert "stopped by signal at step 3" in (tmp_path / "log.txt").read_text()
    assert fit(ToyConfig(out=str(tmp_path)), build_toy, resume=True) == 0
    _assert_bitwise(_ckpt(straight, 6), _ckpt(tmp_path, 6))


def test_nan_loss_stops_naming_the_step_before_it_touches_the_weights(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3\b"):
        fit(ToyConfig(out=str(tmp_path), poison_at=3, ckpt_every=1), build_toy)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [f"step_0000000{i}.safetensors" for i in (1, 2, 3)]
    assert all(torch.isfinite(t.float()).all() for t in _ckpt(tmp_path, 3).values())


def test_corrupt_newest_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, straight):
    run = tmp_path / "run"
    assert fit(ToyConfig(out=str(run), steps=8), build_toy) == 0  # checkpoints 2, 4, 6, 8
    final = _ckpt(run, 8)
    checkpoint_path(run, 8).write_bytes(b"")  # empty
    six = checkpoint_path(run, 6).read_bytes()
    checkpoint_path(run, 6).write_bytes(six[: len(six) // 2])  # truncated
    four = bytearray(checkpoint_path(run, 4).read_bytes())
    four[-4] ^= 1  # one flipped bit in the tensor data: only the checksum sees it
    checkpoint_path(run, 4).write_bytes(bytes(four))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(checkpoint_path(run, 4))

    assert fit(ToyConfig(out=str(run), steps=8), build_toy, resume=True) == 0
    log = (run / "log.txt").read_text()
    for step in (8, 6, 4):
        assert f"skipping corrupt checkpoint {checkpoint_path(run, step)}" in log
        assert checkpoint_path(run, step).with_name(f"step_{step:08d}.safetensors.corrupt").is_file()
    assert f"resumed from {checkpoint_path(run, 2)}" in log
    _assert_bitwise(final, _ckpt(run, 8))  # steps 3..8 redone exactly

    for name in ("step_00000002.safetensors", "step_00000004.safetensors", "step_00000006.safetensors",
                 "step_00000008.safetensors"):
        (run / "checkpoints" / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        fit(ToyConfig(out=str(run), steps=8), build_toy, resume=True)


def test_resume_keeps_the_saved_settings_unless_given_explicitly(tmp_path):
    assert fit(ToyConfig(out=str(tmp_path), steps=2), build_toy) == 0
    # as from the command line with nothing but --resume: the config's defaults must not leak in
    assert fit(ToyConfig(out=str(tmp_path), steps=1000, log_every=7), build_toy, resume=True, given={}) == 0
    assert read_metadata(checkpoint_path(tmp_path, 2))["config"]["steps"] == 2
    assert not checkpoint_path(tmp_path, 3).exists()
    given = {"steps": "--steps", "batch_size": "--batch-size"}
    assert fit(ToyConfig(out=str(tmp_path), steps=4, batch_size=4), build_toy, resume=True, given=given) == 0
    meta = read_metadata(checkpoint_path(tmp_path, 4))
    assert meta["config"]["steps"] == 4 and meta["config"]["log_every"] == 1
    with pytest.raises(ValueError, match="--batch-size 8 differs from the run's saved 4"):
        fit(ToyConfig(out=str(tmp_path), steps=6, batch_size=8), build_toy, resume=True, given=given)


def test_cli_resume_without_steps_keeps_the_runs_own_length(tmp_path):
    """Issue 14.3: a resumed run showed `290/20000` (the parser's default) instead of its own 400."""
    out = tmp_path / "ae"
    cmd = [sys.executable, "-m", "t2i.cli", "train", "autoencoder", "--out", str(out)]
    first = subprocess.run(cmd + ["--preset", "tiny", "--image-size", "16", "--batch-size", "2", "--steps", "4",
                                  "--ckpt-every", "2", "--keep", "5", "--image-every", "0", "--threads", "1"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint_path(out, 4).unlink()  # as if killed after step 2's checkpoint
    try:
        again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed run went on past its own 4 steps")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "autoencoder run" in (log := (out / "log.txt").read_text()) and "step 2/4, resumed from" in log
    assert read_metadata(checkpoint_path(out, 4))["config"]["steps"] == 4
    # an option that would change what is trained is refused on --resume, naming it
    changed = subprocess.run(cmd + ["--resume", "--kl-weight", "0.5"], capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "--kl-weight 0.5 differs from the run's saved 1e-06" in changed.stderr


def test_help_shows_defaults_and_what_each_preset_is(capsys):
    from t2i.cli import main

    for command, expected in (("autoencoder", ["(default: 3000)", "tiny = block channels (8, 16, 16)",
                                               "(default: shapes_f4)"]),
                              ("ldm", ["(default: 20000)", "shapes_s = block channels (32, 64, 128)",
                                       "(default: shapes_s)", "(default: v_prediction)"]),
                              ("preview", ["(default: 2000)", "(default: 64)"]),
                              ("clip", ["(default: 1000)", "(default: 128)"])):
        with pytest.raises(SystemExit):
            main(["train", command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # unwrapped
        for e in expected:
            assert e in text, (command, e)


def test_sample_grid_carries_its_captions(tmp_path):
    images = torch.zeros(3, 3, 16, 16)  # mid-gray cells: only the captions differ
    save_grid(images, tmp_path / "a.png", nrow=3, captions=["a red circle", "a blue square", ""])
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    scale = math.ceil(CAPTION_CELL / 16)
    w = 16 * scale
    assert grid.shape[1] == 3 * (w + 2) + 2 and grid.shape[0] > w + 10  # cells enlarged, room for text below
    strips = [grid[2 + w: -2, 2 + c * (w + 2): 2 + c * (w + 2) + w] for c in range(3)]
    inked = [(s < 128).any(axis=-1).sum() for s in strips]  # dark text pixels on the white strip
    assert inked[0] > 20 and inked[1] > 20 and inked[2] == 0
    assert not np.array_equal(strips[0], strips[1])
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        save_grid(images, tmp_path / "b.png", captions=["a", "b"])


def test_fit_writes_the_task_grid_with_its_captions(tmp_path):
    def build(cfg: ToyConfig, run: Run) -> Task:
        task = build_toy(cfg, run)
        task.grid = lambda: Grid(torch.zeros(2, 3, 8, 8), ["first", "second"], nrow=2)
        task.grid_name = "toy"
        return task

    assert fit(ToyConfig(out=str(tmp_path), steps=2, image_every=1), build) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["toy_00000001.png", "toy_00000002.png"]
