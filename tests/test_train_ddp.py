"""`t2i train ldm` under `torchrun --nproc_per_node 2` (DDP over gloo on CPU) trains: both ranks
read disjoint data, only rank 0 writes, and the gradients are averaged (the run differs from a
single-process run on the same per-rank batch)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from t2i.autoencoders.kl import AutoencoderKL
from t2i.systems.shapes_ldm import VAE_PRESETS
from t2i.train.autoencoder import save_vae
from t2i.train.checkpoint import read_metadata


def test_two_process_torchrun_run_trains(tmp_path):
    torch.manual_seed(0)
    vae_path = tmp_path / "vae.safetensors"
    save_vae(AutoencoderKL(VAE_PRESETS["tiny"]), vae_path)
    args = ["-m", "t2i.cli", "train", "ldm", "--vae", str(vae_path), "--preset", "tiny", "--image-size", "16",
            "--batch-size", "4", "--steps", "6", "--ckpt-every", "3", "--image-every", "0", "--export-every", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", *args, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    ckpt = tmp_path / "ddp" / "checkpoints" / "step_00000006.safetensors"
    meta = read_metadata(ckpt)
    assert meta["data_position"] == 6 * 4 * 2  # two ranks, four samples each, six steps
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
    d = load_file(ckpt)
    s = load_file(tmp_path / "single" / "checkpoints" / "step_00000006.safetensors")
    start_w = "unet.conv_out.weight"
    assert torch.isfinite(d[start_w]).all()
    # Same init, same rank-0 data: only averaging with rank 1's gradients makes them differ.
    assert not torch.equal(d[start_w], s[start_w])
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert log.count("ldm run") == 1  # only rank 0 logs
