"""`t2i train finetune` (issue 21): full fine-tuning of a tiny random SD1 model's U-Net on a tiny captioned
folder. The loss at fixed noise falls on an overfit with gradient checkpointing; the exported diffusers
folder is read by diffusers and by t2i with exactly the run's final weights; checkpointing changes no
gradient (and keeps fewer activations); a resumed run ends on the same bits (with an EMA too); `--bf16`
is refused by name on a CPU without native bf16 and trains where it has it; a single file comes back as
a single file, the shapes model as its own file."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import t2i
from t2i.checkpoints.diffusers_folder import load_diffusers_parts
from t2i.checkpoints.export import save_single_file
from t2i.cli import main
from t2i.nets.grad_checkpoint import CHECKPOINTED, disable_gradient_checkpointing, enable_gradient_checkpointing
from t2i.systems.shapes_ldm import write_tiny_model
from t2i.train.checkpoint import latest_intact_checkpoint, load_checkpoint
from t2i.train.distributed import DistInfo
from t2i.train.finetune import FinetuneConfig
from t2i.train.lora import FrozenModel

pytestmark = pytest.mark.usefixtures("one_thread")


def train(model: Path, data: Path, out: Path, *extra: str) -> int:
    """`t2i train finetune` on the folder; returns its exit code."""
    args = ["train", "finetune", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(out), "--image-every", "0", "--log-every", "1", "--batch-size", "2", *extra]
    return main(args)


def fixed_loss(model: Path, data: Path) -> float:
    """The run's held-fixed loss (4 items, fixed t and noise) of a model file or folder."""
    run = SimpleNamespace(info=DistInfo(), log=SimpleNamespace(text=print))
    frozen = FrozenModel(FinetuneConfig(out="", model=str(model), data_path=str(data), eval_items=4), run)
    return frozen.fixed_loss(frozen.pipe.text_encoder.encode)


def trained_unet(model: Path, out: Path, name: str = "unet") -> dict[str, torch.Tensor]:
    """The U-Net weights (or the EMA's: name "ema") of the run's newest checkpoint."""
    unet = t2i.load(model).unet
    load_checkpoint(latest_intact_checkpoint(out, print), modules={name: unet}, optimizers={}, restore_rng=False)
    return unet.state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logged(out: Path, key: str) -> list[float]:
    return [float(line.split(f"{key}=")[1].split()[0]) for line in (out / "log.txt").read_text().splitlines()
            if f"{key}=" in line]


def test_checkpointed_finetune_overfits_and_its_folder_loads_in_diffusers_and_t2i(sd1_folder, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    model, data = sd1_folder
    out = tmp_path / "run"
    assert train(model, data, out, "--steps", "40", "--lr", "1e-3", "--warmup", "5", "--gradient-checkpointing") == 0
    exported = out / "model"
    before, after = fixed_loss(model, data), fixed_loss(exported, data)
    measured = logged(out, "finetune/fixed_loss")
    print(f"loss at fixed noise on the 4 images: {before:.3f} -> {after:.3f} (logged {measured})")
    assert after < 0.25 * before
    assert measured == [pytest.approx(after, rel=1e-4)]  # the run's own measurement, on the export

    final = trained_unet(model, out)
    base = t2i.load(model).unet.state_dict()
    ours = t2i.load(exported).unet.state_dict()
    theirs = UNet2DConditionModel.from_pretrained(exported, subfolder="unet").state_dict()
    DiffusionPipeline.from_pretrained(exported)  # the whole folder reads, not only its U-Net
    moved = max_diff(final, base)
    print(f"exported U-Net vs the run's final weights: t2i {max_diff(ours, final):.1e}, diffusers "
          f"{max_diff(theirs, final):.1e}; the training moved them by {moved:.2e}")
    assert moved > 1e-3
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert all(torch.equal(ours[k], final[k]) for k in final)
    assert theirs.keys() == final.keys() and all(torch.equal(theirs[k], final[k]) for k in final)


def test_gradient_checkpointing_keeps_the_gradients_and_fewer_activations(sd1_folder):
    model, _ = sd1_folder
    plain = t2i.load(model).unet.train().requires_grad_(True)
    checkpointed = copy.deepcopy(plain)
    wrapped = enable_gradient_checkpointing(checkpointed)
    blocks = [m for m in checkpointed.modules() if isinstance(m, CHECKPOINTED)]
    assert wrapped == len(blocks) > 0

    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10.0, 700.0])

    def grads_and_saved(unet: torch.nn.Module) -> tuple[list[torch.Tensor], int]:
        """The parameters' gradients of one loss, and the bytes autograd kept for the backward pass."""
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        unet.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = unet(x, t, context=context).square().mean()
        loss.backward()
        return [p.grad for p in unet.parameters()], saved[0]

    expected, kept_plain = grads_and_saved(plain)
    got, kept_ckpt = grads_and_saved(checkpointed)
    err = max(((g - e).abs().max() / e.abs().max().clamp(min=1e-30)).item() for g, e in zip(got, expected, strict=True))
    print(f"{wrapped} blocks checkpointed: max relative gradient error {err:.1e}; tensors kept for backward "
          f"{kept_plain / 1e3:.0f} KB -> {kept_ckpt / 1e3:.0f} KB")
    assert err < 1e-6
    assert kept_ckpt < 0.6 * kept_plain
    # A deep copy (an EMA) checkpoints its own blocks; undone, the blocks keep everything again.
    twin = copy.deepcopy(checkpointed)
    assert all(b.forward.__self__ is b for b in twin.modules() if isinstance(b, CHECKPOINTED))
    assert disable_gradient_checkpointing(checkpointed) == wrapped
    assert grads_and_saved(checkpointed)[1] == kept_plain


def test_resume_is_exact_with_an_ema(sd1_folder, tmp_path):
    model, data = sd1_folder
    common = ("--lr", "1e-3", "--ckpt-every", "3", "--ema-decay", "0.9", "--gradient-checkpointing")
    assert train(model, data, tmp_path / "a", "--steps", "6", *common) == 0
    assert train(model, data, tmp_path / "b", "--steps", "3", *common) == 0
    assert train(model, data, tmp_path / "b", "--steps", "6", "--resume") == 0
    a, b = (load_file(tmp_path / r / "model" / "unet" / "diffusion_pytorch_model.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained, averaged = trained_unet(model, tmp_path / "a"), trained_unet(model, tmp_path / "a", "ema")
    assert all(torch.equal(a[k], averaged[k]) for k in a)  # the EMA is what is exported ...
    assert max_diff(trained, averaged) > 1e-4  # ... and it is not the trained weights
    resumed = trained_unet(model, tmp_path / "b")
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)


def test_bf16_is_refused_without_native_bf16_and_trains_with_it(sd1_folder, tmp_path, monkeypatch, capsys):
    model, data = sd1_folder
    monkeypatch.setattr(t2i, "native_bf16", lambda cpuinfo=None: False)
    assert train(model, data, tmp_path / "refused", "--steps", "1", "--bf16") != 0
    err = capsys.readouterr().err
    assert "--bf16" in err and "avx512_bf16" in err and "amx_bf16" in err
    monkeypatch.setattr(t2i, "native_bf16", lambda cpuinfo=None: True)  # (emulated here: slow, but tiny)
    assert train(model, data, tmp_path / "bf16", "--steps", "2", "--lr", "1e-3") == 0
    fp32 = logged(tmp_path / "bf16", "finetune/loss")
    assert train(model, data, tmp_path / "run", "--steps", "2", "--lr", "1e-3", "--bf16") == 0
    losses = logged(tmp_path / "run", "finetune/loss")
    print(f"step losses: float32 {fp32}, bf16 autocast {losses}")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(fp32[0], rel=0.05) and losses[0] != fp32[0]  # the same step, in bf16
    assert all(v.dtype == torch.float32 for v in trained_unet(model, tmp_path / "run").values())  # master weights


def test_single_file_in_single_file_out_and_the_shapes_model(sd1_folder, tmp_path):
    model, data = sd1_folder
    single = save_single_file(load_diffusers_parts(model), tmp_path / "sd1_folder.safetensors")
    out = tmp_path / "run"
    assert train(single, data, out, "--steps", "2", "--lr", "1e-3", "--optimizer", "sgd") == 0
    assert not (out / "model").exists()
    final, base = trained_unet(single, out), t2i.load(single).unet.state_dict()
    read = t2i.load(out / "model.safetensors")
    assert read.family == "stable_diffusion" and max_diff(final, base) > 0
    assert all(torch.equal(v, final[k]) for k, v in read.unet.state_dict().items())

    shapes = write_tiny_model(tmp_path / "shapes")
    out = tmp_path / "shapes_run"
    assert train(shapes, data, out, "--steps", "2", "--lr", "1e-3") == 0
    final, read = trained_unet(shapes, out), t2i.load(out / "model.safetensors")
    assert read.family == "shapes_ldm" and max_diff(final, t2i.load(shapes).unet.state_dict()) > 0
    assert all(torch.equal(v, final[k]) for k, v in read.unet.state_dict().items())


def test_the_model_is_exported_where_the_run_ends_not_with_every_checkpoint(sd1_folder, tmp_path, monkeypatch):
    """A full fine-tune's export is a whole U-Net (3.4 GB for SD 1.5): by default it is written once, at the
    end; `--export-every 0` writes it with every checkpoint as the other families do."""
    import t2i.train.finetune as finetune

    _, data = sd1_folder
    shapes = write_tiny_model(tmp_path / "shapes")
    writes: list[Path] = []
    real = finetune.write_in_place
    monkeypatch.setattr(finetune, "write_in_place",
                        lambda write, unet, dst: writes.append(dst) or real(write, unet, dst))
    assert train(shapes, data, tmp_path / "once", "--steps", "3", "--ckpt-every", "1", "--lr", "1e-3") == 0
    assert writes == [tmp_path / "once" / "model.safetensors"]
    assert len(list((tmp_path / "once" / "checkpoints").glob("*.safetensors"))) == 2  # --keep 2 of the 3
    writes.clear()
    assert train(shapes, data, tmp_path / "each", "--steps", "3", "--ckpt-every", "1", "--lr", "1e-3",
                 "--export-every", "0") == 0
    assert len(writes) == 3
