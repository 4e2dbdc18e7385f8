"""kill -9 in the middle of `t2i train ldm`, then `--resume`: the weights, EMA, optimizer state and
RNG states at the end are bitwise those of an uninterrupted run of the same length."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from t2i.autoencoders.kl import AutoencoderKL
from t2i.systems.shapes_ldm import VAE_PRESETS
from t2i.train.autoencoder import save_vae

STEPS = 40


def _cmd(out: Path, vae: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "t2i.cli", "train", "ldm", "--out", str(out), "--vae", str(vae),
            "--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--steps", str(STEPS),
            "--ckpt-every", "5", "--keep", "100", "--image-every", "0", "--export-every", "1000",
            "--threads", "1", *extra]


def test_kill9_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    vae_path = tmp_path / "vae.safetensors"
    save_vae(AutoencoderKL(VAE_PRESETS["tiny"]), vae_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    subprocess.run(_cmd(tmp_path / "full", vae_path), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, vae_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpts = killed / "checkpoints"
    while time.time() < deadline and not (ckpts.is_dir() and any(p.suffix == ".safetensors" for p in ckpts.iterdir())):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = sorted(p.name for p in ckpts.iterdir() if p.suffix == ".safetensors")
    assert done_before_kill and f"step_{STEPS:08d}.safetensors" not in done_before_kill, done_before_kill

    subprocess.run(_cmd(killed, vae_path, "--resume"), check=True, env=env, capture_output=True)
    log = (killed / "log.txt").read_text()
    assert "resumed from" in log

    a = load_file(tmp_path / "full" / "checkpoints" / f"step_{STEPS:08d}.safetensors")
    b = load_file(killed / "checkpoints" / f"step_{STEPS:08d}.safetensors")
    assert set(a) == set(b)
    assert any(k.startswith("optim.") for k in a) and any(k.startswith("ema.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
