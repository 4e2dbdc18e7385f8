"""`t2i train lora` (issue 21): a LoRA trained for a few steps on a tiny random SD1 model and a tiny
captioned folder is read back by diffusers' `load_lora_weights` (the oracle) with every key matched and
gives the same fused weights as t2i's merge; the merged file computes what the training hooks computed;
the loss at fixed noise falls on a tiny overfit; a resumed run ends on the same bits; the shapes LDM
trains too; a target that matches nothing is refused by name. `--aspect-buckets`: SDXL's U-Net is given
each batch's own original sizes and crops, SD1's sees non-square latents, a resumed run ends on the same
bits."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from captioned_folder import write_captioned_folder
from PIL import Image
from safetensors import safe_open
from test_lora import _text_error, _unet_error

import t2i
from t2i.adapters.lora import apply_loras, read_lora
from t2i.cli import main
from t2i.systems.shapes_ldm import write_tiny_model
from t2i.train.checkpoint import latest_intact_checkpoint, load_checkpoint
from t2i.train.distributed import DistInfo
from t2i.train.lora import FrozenModel, LoraNetwork, LoraTrainConfig, select_layers

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHT_TOL = 1e-6  # max |diffusers fused - t2i merged| of any weight
def train(model: Path, data: Path, out: Path, *extra: str) -> Path:
    """`t2i train lora` on the folder; returns the written LoRA file."""
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data), "--out", str(out),
            "--image-every", "0", "--log-every", "1", "--batch-size", "2", *extra]
    assert main(args) == 0
    return out / "lora.safetensors"


def frozen(model: Path, data: Path) -> FrozenModel:
    """The trainer's frozen model, outside a run (for the fixed-noise loss)."""
    run = SimpleNamespace(info=DistInfo(), log=SimpleNamespace(text=print))
    return FrozenModel(LoraTrainConfig(out="", model=str(model), data_path=str(data), eval_items=4), run)


def test_trained_lora_is_read_by_diffusers_with_every_key_and_merges_alike(sd1_folder, tmp_path, caplog):
    from diffusers import DiffusionPipeline

    model, data = sd1_folder
    path = train(model, data, tmp_path / "run", "--steps", "4", "--lr", "1e-2", "--text-encoder")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert {k.split("_")[1] for k in layers} == {"unet", "te"}  # lora_unet_... and lora_te_...
    assert len(keys) == 3 * len(layers)  # lora_down, lora_up and alpha for each

    ref = DiffusionPipeline.from_pretrained(model)
    with caplog.at_level(logging.WARNING):
        ref.load_lora_weights(str(path))
    complaints = [r.getMessage() for r in caplog.records if any(w in r.getMessage().lower()
                                                                  for w in ("unexpected", "missing", "not found"))]
    assert not complaints
    # Every layer of the file became a PEFT layer of diffusers' U-Net or text encoder.
    peft = [m for net in (ref.unet, ref.text_encoder) for m in net.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(peft) == len(layers)
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora_weights()

    ours = t2i.load(model)
    moved = _unet_error(ref, ours)
    with apply_loras(ours, [(path, 1.0)]):
        unet_err, text_err = _unet_error(ref, ours), _text_error(ref, ours, "sd1")
    print(f"trained LoRA, {len(layers)} layers: U-Net {unet_err:.2e}, text {text_err:.2e} (moved {moved:.2e})")
    assert moved > 1e-3  # the training changed the weights: the comparison can fail
    assert unet_err < WEIGHT_TOL and text_err < WEIGHT_TOL


def test_the_file_merges_to_what_the_training_hooks_computed(sd1_folder, tmp_path):
    model, data = sd1_folder
    out = tmp_path / "run"
    path = train(model, data, out, "--steps", "3", "--lr", "1e-2")
    hooked, merged = t2i.load(model), t2i.load(model)
    net = LoraNetwork(select_layers(hooked, LoraTrainConfig.unet_targets, None), 4, 4.0)
    load_checkpoint(latest_intact_checkpoint(out, print), modules={"lora": net}, optimizers={}, restore_rng=False)
    net.attach()
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        expected = hooked.unet(x, t, context=context)
        plain = merged.unet(x, t, context=context)
        with apply_loras(merged, [(path, 1.0)]):
            got = merged.unet(x, t, context=context)
    err, moved = (got - expected).abs().max().item(), (expected - plain).abs().max().item()
    print(f"merged file vs training hooks: {err:.2e} (the LoRA moved the output by {moved:.2e})")
    assert moved > 1e-3 and err < 1e-5 * expected.abs().max().item()


def test_loss_falls_on_a_tiny_overfit(sd1_folder, tmp_path):
    model, data = sd1_folder
    path = train(model, data, tmp_path / "run", "--steps", "40", "--lr", "1e-2", "--warmup", "5")
    f = frozen(model, data)
    before = f.fixed_loss(f.pipe.text_encoder.encode)
    with apply_loras(f.pipe, [(path, 1.0)]):
        after = f.fixed_loss(f.pipe.text_encoder.encode)
    logged = [float(line.split("lora/fixed_loss=")[1]) for line in (tmp_path / "run" / "log.txt").read_text()
              .splitlines() if "lora/fixed_loss=" in line]
    print(f"loss at fixed noise on the 4 images: {before:.3f} -> {after:.3f} (logged {logged})")
    assert after < 0.5 * before
    assert logged == [pytest.approx(after, rel=1e-4)]  # the run's own measurement, on the merged file


def test_resume_is_exact(sd1_folder, tmp_path):
    model, data = sd1_folder
    common = ("--lr", "1e-2", "--ckpt-every", "3", "--text-encoder")
    straight = train(model, data, tmp_path / "a", "--steps", "6", *common)
    train(model, data, tmp_path / "b", "--steps", "3", *common)
    resumed = train(model, data, tmp_path / "b", "--steps", "6", "--resume")
    a, _ = read_lora(straight)
    b, _ = read_lora(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)
    assert any(layer.up.abs().max() > 0 for layer in a.values())  # trained: up started at zero


def test_shapes_model_lora_round_trips(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "shapes")
    data = write_captioned_folder(tmp_path / "data")
    path = train(model, data, tmp_path / "run", "--steps", "2", "--lr", "1e-2", "--image-every", "2",
                 "--sample-steps", "2")
    assert (tmp_path / "run" / "samples" / "lora_00000002.png").is_file()
    pipe = t2i.load(model)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with apply_loras(pipe, [(path, 1.0)]) as handle:
        assert handle.layers == len(read_lora(path)[0]) > 0
        assert any(not torch.equal(base[k], v) for k, v in pipe.unet.state_dict().items())
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(tmp_path / "te"), "--text-encoder"]
    assert main(args) != 0
    assert "text-encoder LoRAs are trained on CLIP encoders" in capsys.readouterr().err


def test_targets_that_match_nothing_are_named(sd1_folder, tmp_path, capsys):
    model, data = sd1_folder
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(tmp_path / "run"), "--unet-targets", "to_q,to_qq"]
    assert main(args) != 0
    assert "to_qq" in capsys.readouterr().err


def test_sdxl_unet_lora_is_read_by_diffusers_with_every_key(tmp_path, caplog):
    """SDXL: kohya's SDXL names (`lora_unet_input_blocks_...`, the original U-Net layout)."""
    from diffusers import DiffusionPipeline
    from sd_oracles import build_sdxl

    build_sdxl(tmp_path / "model")
    data = write_captioned_folder(tmp_path / "data")
    path = train(tmp_path / "model", data, tmp_path / "run", "--steps", "3", "--lr", "1e-2")
    layers = read_lora(path)[0]
    assert all(name.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for name in layers)
    ref = DiffusionPipeline.from_pretrained(tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        ref.load_lora_weights(str(path))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    assert len([m for m in ref.unet.modules() if hasattr(m, "lora_A") and m.lora_A]) == len(layers)
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora_weights()
    ours = t2i.load(tmp_path / "model")
    moved = _unet_error(ref, ours)
    with apply_loras(ours, [(path, 1.0)]):
        err = _unet_error(ref, ours)
    print(f"trained SDXL LoRA, {len(layers)} layers: U-Net {err:.2e} (moved {moved:.2e})")
    assert moved > 1e-3 and err < WEIGHT_TOL


def test_sdxl_text_encoder_lora_trains_both_towers_and_diffusers_reads_every_key(tmp_path, caplog):
    """SDXL with --text-encoder: `lora_te1_` and `lora_te2_` layers, every one a PEFT layer in diffusers'
    two text encoders, fused to the weights t2i merges."""
    from diffusers import DiffusionPipeline
    from sd_oracles import build_sdxl

    build_sdxl(tmp_path / "model")
    data = write_captioned_folder(tmp_path / "data")
    path = train(tmp_path / "model", data, tmp_path / "run", "--steps", "3", "--lr", "1e-2", "--text-encoder",
                 "--unet-targets", "to_q")
    layers = read_lora(path)[0]
    ours_layers = t2i.load(tmp_path / "model").text_encoder.encoders[0].model.cfg.layers
    assert {name.split("_")[1] for name in layers} == {"unet", "te1", "te2"}
    untrained = sorted(name for name, layer in layers.items() if not layer.up.abs().max() > 0)
    # SDXL reads the first tower's penultimate layer and nothing else of it: its last layer gets no gradient
    # (kohya's and diffusers' trainers include it all the same); every other layer trained.
    last = f"layers_{ours_layers - 1}_"
    assert untrained and all(n.startswith("lora_te1_") and last in n for n in untrained), untrained
    ref = DiffusionPipeline.from_pretrained(tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        ref.load_lora_weights(str(path))
    assert not [r for r in caplog.records if any(w in r.getMessage().lower() for w in ("unexpected", "missing"))]
    nets = (ref.unet, ref.text_encoder, ref.text_encoder_2)
    assert len([m for net in nets for m in net.modules() if hasattr(m, "lora_A") and m.lora_A]) == len(layers)
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora_weights()
    ours = t2i.load(tmp_path / "model")
    moved = _text_error(ref, ours, "sdxl")
    with apply_loras(ours, [(path, 1.0)]):
        err = _text_error(ref, ours, "sdxl")
    print(f"trained SDXL text-encoder LoRA, {len(layers)} layers: text weights {err:.2e} (moved {moved:.2e})")
    assert moved > 1e-3 and err < WEIGHT_TOL


def test_evaluations_read_their_own_source_not_the_training_stream(sd1_folder, tmp_path, monkeypatch):
    """The fixed-noise loss and the grid prompts read a second source: the training source (a stream
    for WebDataset shards, read by the loop's prefetch thread meanwhile) sees training batches only."""
    import t2i.train.lora as lora_module

    sources = []
    real_open = lora_module.open_data

    def recording_open(*args, **kwargs):
        source = real_open(*args, **kwargs)
        calls = []
        batch = source.batch
        source.batch = lambda position, n, info: calls.append((position, n)) or batch(position, n, info)
        sources.append(calls)
        return source

    monkeypatch.setattr(lora_module, "open_data", recording_open)
    model, data = sd1_folder
    train(model, data, tmp_path / "run", "--steps", "3", "--eval-every", "1", "--eval-items", "3")
    training = sources[0]
    assert training and all(n == 2 for _, n in training), training  # --batch-size 2 only
    assert any(n == 3 for _, n in sources[1]), sources[1:]  # the evaluation's 3 items, elsewhere


# (height, width) of a folder of mixed aspect ratios: two images for each of four buckets at 16 px.
MIXED = [(16, 32), (32, 16), (18, 30), (20, 20), (24, 48), (48, 24), (24, 40), (40, 40)]


def record_unet_calls(monkeypatch) -> list[tuple[tuple[int, ...], torch.Tensor | None]]:
    """(latent shape, time_ids or None) of every U-Net forward from now on."""
    from t2i.nets.unet import UNet

    seen, forward = [], UNet.forward

    def recording(self, x, t, *args, **kwargs):
        seen.append((tuple(x.shape), kwargs.get("time_ids")))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    return seen


def test_sdxl_aspect_buckets_give_the_unet_each_batch_placement(tmp_path, monkeypatch):
    """SDXL `--aspect-buckets --crop-zoom 1 2`: each step's latents are one bucket's size, and the time ids
    the U-Net gets are the batch's own (the true original size of each image, its crop in the bucket,
    the bucket); the fixed-noise loss stays square and uncropped; the file is written and read back."""
    from sd_oracles import build_sdxl

    from t2i.train.data import open_data

    build_sdxl(tmp_path / "model")
    data = write_captioned_folder(tmp_path / "data", sizes=MIXED)
    seen = record_unet_calls(monkeypatch)
    path = train(tmp_path / "model", data, tmp_path / "run", "--steps", "4", "--lr", "1e-2", "--aspect-buckets",
                 "--crop-zoom", "1", "2")
    # the run's data, opened as the trainer does: native 16 px, multiple 2 (VAE) * 2 (U-Net levels), seed 0
    buckets = open_data("folder", str(data), 16, 0, size_multiple=4, crop_zoom=(1.0, 2.0))
    want = [buckets.time_ids(2 * k, 2, DistInfo()) for k in range(4)]
    files = sorted(data.glob("*.png"))
    for k, ((shape, ids), w) in enumerate(zip(seen[:4], want, strict=True)):
        idx = buckets.batch(2 * k, 2, DistInfo())[2]
        assert shape == (2, 4, int(w[0, 4]) // 2, int(w[0, 5]) // 2)  # latents at the bucket's size
        assert torch.equal(ids, w), (ids, w)
        # the original sizes are the files' own
        assert ids[:, :2].tolist() == [[Image.open(files[i]).height, Image.open(files[i]).width] for i in idx]
    assert all(torch.equal(ids, torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(1, 6))
               for _, ids in seen[4:])  # fixed-noise loss: one square item at a time
    print("SDXL bucket steps: latents", [s[2:] for s, _ in seen[:4]], "time ids", [w.tolist() for w in want])
    assert any(s[2] != s[3] for s, _ in seen[:4]) and any(w[:, 2:4].abs().sum() > 0 for w in want)
    losses = [float(line.split("lora/loss=")[1].split()[0]) for line in
              (tmp_path / "run" / "log.txt").read_text().splitlines() if "lora/loss=" in line]
    layers = read_lora(path)[0]
    print(f"losses {losses}, {len(layers)} layers")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert layers and any(layer.up.abs().max() > 0 for layer in layers.values())


def test_sd1_aspect_buckets_reach_the_unet_non_square_and_resume_exactly(sd1_folder, tmp_path, monkeypatch, capsys):
    model, _ = sd1_folder
    data = write_captioned_folder(tmp_path / "data", sizes=MIXED)
    seen = record_unet_calls(monkeypatch)
    common = ("--lr", "1e-2", "--ckpt-every", "2", "--aspect-buckets", "--text-encoder")
    straight = train(model, data, tmp_path / "a", "--steps", "4", *common)
    shapes = [s for s, _ in seen[:4]]
    with capsys.disabled():
        print("SD1 bucket steps: latents", [s[2:] for s in shapes])
    assert any(s[2] != s[3] for s in shapes) and all(ids is None for _, ids in seen)
    train(model, data, tmp_path / "b", "--steps", "2", *common)
    resumed = train(model, data, tmp_path / "b", "--steps", "4", "--resume")
    a, b = read_lora(straight)[0], read_lora(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down)
                                        for k in a)
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(tmp_path / "c"), "--crop-zoom", "0.5", "1.6"]
    assert main(args) != 0
    assert "--crop-zoom enlarges and crops the images of --aspect-buckets" in capsys.readouterr().err
