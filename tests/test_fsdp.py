"""`t2i train ldm --parallel fsdp` under `torchrun --nproc_per_node 2` (FSDP2 over gloo on CPU), reading
WebDataset shards: the run computes what one process computes on the same global batch, a kill -9 and
`--resume` end bitwise equal to the uninterrupted run, and its sharded checkpoint converts to the model
file `t2i generate` loads."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import _cmd  # the tiny LDM's command line

from t2i.autoencoders.kl import AutoencoderKL
from t2i.diffusion.losses import DiffusionLoss
from t2i.systems.shapes_ldm import VAE_PRESETS, ShapesLDMConfig
from t2i.train.autoencoder import save_vae
from t2i.train.checkpoint import read_metadata
from t2i.train.distributed import DistInfo
from t2i.train.fit import Run
from t2i.train.ldm import LDMTrainConfig, build_ldm
from t2i.train.loop import RunLog, set_lr, step_generator, warmup_lr

STEPS, BATCH, LR = 4, 4, 2e-3
RUN = ("--steps", str(STEPS), "--batch-size", str(BATCH), "--ckpt-every", "2", "--lr", str(LR), "--warmup", "2",
       "--log-every", "1", "--parallel", "fsdp")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, vae: Path, *extra: str) -> list[str]:
    """The tiny LDM's command under `torchrun --nproc_per_node 2`, sharded, on the shards beside `vae`."""
    data = ("--data", "webdataset", "--data-path", str(vae.parent / "shards"))
    python, *args = _cmd(out, vae, *RUN, *data, *extra)
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, Path]:
    """(vae file, run directory) of one uninterrupted 2-process FSDP run."""
    from t2i.cli import main

    tmp = tmp_path_factory.mktemp("fsdp")
    assert main(["data", "shapes", "--n", "32", "--size", "16", "--format", "webdataset", "--shard-size", "8",
                 "--out", str(tmp / "shards")]) == 0
    torch.manual_seed(0)
    vae = tmp / "vae.safetensors"
    save_vae(AutoencoderKL(VAE_PRESETS["tiny"]), vae)
    done = subprocess.run(_torchrun(tmp / "full", vae), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return vae, tmp / "full"


def _logged(run: Path, name: str = "loss") -> list[float]:
    """A scalar of every step's line in log.txt (rank 0's value)."""
    return [float(m) for m in re.findall(rf"^step \d+ .*ldm/{name}=(\S+)", (run / "log.txt").read_text(), re.M)]


def _single_process_reference(vae: Path, out: Path
                              ) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the same global batch: each step's two rank shares (their data and their noise,
    drawn as the ranks draw them) averaged into one loss and one optimizer step. Returns rank 0's share of
    each step's loss and the gradient norm (what the FSDP run logs), the initial and the final EMA U-Net."""
    cfg = LDMTrainConfig(out=str(out), vae_path=str(vae), unet_preset="tiny", image_size=16, batch_size=BATCH,
                         steps=STEPS, lr=LR, warmup=2, threads=1, data="webdataset",
                         data_path=str(vae.parent / "shards"))
    torch.manual_seed(cfg.seed)
    run = Run(DistInfo(), RunLog(out, DistInfo(), 0, 0, quiet=True))
    task = build_ldm(cfg, run)
    unet, opt = task.modules["unet"], task.optimizers["opt"]
    model_cfg = ShapesLDMConfig.from_dict(cfg.model)
    loss_fn = DiffusionLoss(model_cfg.schedule.alphas_cumprod(), cfg.prediction_type, cfg.min_snr_gamma)
    init = {k: v.clone() for k, v in unet.state_dict().items()}
    rank0, norms = [], []
    for step in range(STEPS):
        shares = []
        for rank in (0, 1):
            run.info = DistInfo(rank, 2, 0)  # `prepare` reads this rank's slice of the global batch
            gen = step_generator(cfg.seed, step, rank)
            with torch.no_grad():
                z, cond = task.prepare(step * BATCH * 2, gen)
            shares.append(loss_fn(unet, z, cond, gen))
        rank0.append(shares[0].item())
        set_lr(opt, warmup_lr(step, cfg.lr, cfg.warmup))
        opt.zero_grad()
        ((shares[0] + shares[1]) / 2).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip).item())
        opt.step()
        task.ema.update(step)
    return rank0, norms, init, task.modules["ema"].state_dict()


def test_fsdp_run_matches_one_process_on_the_global_batch_and_converts(fsdp_run, tmp_path):
    from t2i.cli import main
    from t2i.convert_cli import convert

    vae, run = fsdp_run
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}.dcp"
    meta = read_metadata(ckpt)
    assert meta["data_position"] == STEPS * BATCH * 2 and meta["family"] == "ldm"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    reference, norms, init, ema = _single_process_reference(vae, tmp_path / "reference")
    fsdp_losses = _logged(run)
    assert len(fsdp_losses) == STEPS
    assert fsdp_losses == pytest.approx(reference, rel=1e-4)  # log.txt keeps 5 significant digits
    # The norm of the gradient averaged over both ranks (FSDP reduce-scatters it), before clipping.
    assert _logged(run, "grad_norm") == pytest.approx(norms, rel=1e-4)

    model = tmp_path / "model.safetensors"
    assert convert(ckpt, model) == model
    shipped = load_file(model)
    unet = {k[len("unet."):]: v for k, v in shipped.items() if k.startswith("unet.")}
    assert set(unet) == set(ema)
    # The converted EMA is the reference's to float tolerance: all but a few elements within 1e-6, the rest
    # within a tenth of the learning rate (Adam moves a weight whose gradient is ~0 by up to lr in the
    # direction of that gradient's sign, which rounding can flip); and it has learned far more than that.
    diff = torch.cat([(unet[k] - ema[k]).abs().flatten() for k in ema])
    moved = max((init[k] - ema[k]).abs().max().item() for k in ema)
    assert (diff > 1e-6).float().mean() < 0.02 and diff.max() < LR / 10 < moved, (diff.max(), moved)
    image = tmp_path / "image.png"
    assert main(["generate", "--model", str(model), "a red circle", "--steps", "2", "--seed", "1",
                 "--out", str(image), "--quiet"]) == 0
    assert image.stat().st_size > 0


def test_fsdp_kill9_then_resume_is_bitwise_equal(fsdp_run, tmp_path):
    vae, full = fsdp_run
    killed = tmp_path / "killed"
    # A session of its own, so the SIGKILL reaches torchrun and both of its workers (its process group).
    proc = subprocess.Popen(_torchrun(killed, vae), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = killed / "checkpoints" / "step_00000002.dcp"
    deadline = time.time() + 240
    while time.time() < deadline and not first.is_dir() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert f"step_{STEPS:08d}.dcp" not in names and "step_00000002.dcp" in names, names

    resumed = subprocess.run(_torchrun(killed, vae, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (killed / "log.txt").read_text()
    a = json.loads((full / "checkpoints" / f"step_{STEPS:08d}.dcp" / "t2i_train.json").read_text())
    b = json.loads((killed / "checkpoints" / f"step_{STEPS:08d}.dcp" / "t2i_train.json").read_text())
    # Every rank's shard of the weights, EMA and optimizer state, byte for byte; and the torch RNG states.
    shards = [f for f in a["sha256"] if f.endswith(".distcp")]
    assert len(shards) == 2 and all(a["sha256"][f] == b["sha256"][f] for f in shards)
    for rank in (0, 1):
        ra, rb = (json.loads((run / "checkpoints" / f"step_{STEPS:08d}.dcp" / f"rng_rank{rank}.json").read_text())
                  for run in (full, killed))
        assert ra["torch"] == rb["torch"]
    assert _logged(killed)[-2:] == _logged(full)[-2:]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_index_cannot_run_code(tmp_path):
    from t2i.train.fsdp import safe_reader

    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(pickle.UnpicklingError, match="may not refer to"):
        safe_reader(tmp_path).read_metadata()
    assert not marker.exists()
    # A global from a module nobody imported is refused before the module is imported.
    import sys

    (tmp_path / ".metadata").write_bytes(b"cthis\ns\n.")  # protocol 0 GLOBAL this.s: importing `this` prints
    assert "this" not in sys.modules  # nothing imports the Zen of Python
    with pytest.raises(pickle.UnpicklingError, match="may not refer to this.s"):
        safe_reader(tmp_path).read_metadata()
    assert "this" not in sys.modules


def test_a_damaged_shard_falls_back_to_the_checkpoint_before(fsdp_run, tmp_path):
    import shutil

    from t2i.train.checkpoint import latest_intact_checkpoint

    _, run = fsdp_run
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / f"step_{STEPS:08d}.dcp"
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    warnings: list[str] = []
    assert latest_intact_checkpoint(tmp_path, warnings.append) == tmp_path / "checkpoints" / "step_00000002.dcp"
    assert "__1_0.distcp" in warnings[0] and (tmp_path / "checkpoints" / f"{newest.name}.corrupt").is_dir()


def test_fsdp_without_torchrun_is_refused(tmp_path, monkeypatch):
    from t2i.train.fit import fit

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="runs under torchrun"):
        fit(LDMTrainConfig(out=str(tmp_path), parallel="fsdp"), build_ldm)


@pytest.mark.parametrize("family", ["autoencoder", "vqvae", "preview", "lora", "textual-inversion"])
def test_fsdp_is_offered_only_to_families_whose_checkpoints_convert(family, tmp_path, capsys):
    """FSDP needs the family's sharded checkpoint to convert to its model file (t2i.train.fsdp.FAMILIES);
    the autoencoder's clip list and the adapters' rank-0 exports would silently break under it."""
    from t2i.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", family, "--out", str(tmp_path), "--parallel", "fsdp"])
    assert e.value.code == 2 and "--parallel" in capsys.readouterr().err
