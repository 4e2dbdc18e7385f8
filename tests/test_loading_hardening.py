"""Crafted model files are refused quickly, in one line, without allocating what they ask for (issue 15,
items 8-10).

Each case writes a crafted file or folder (from the tiny SD model the family writes, or from
scratch) and loads it the way a user would (`t2i.load`, `t2i convert`). A refusal must be a
CheckpointError / ValueError (the CLI prints those as one line), take under a second, and raise the
process's peak memory by little: the peak (VmHWM) is reset through /proc/self/clear_refs before
each load, so an allocation that was freed again by the error still shows.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import t2i
from t2i.checkpoints.io import find_weights, load_state_dict, save_state_dict
from t2i.checkpoints.limits import build_checked, check_config
from t2i.cli import main
from t2i.systems.stable_diffusion import SYSTEM, TINY_UNET, export

MAX_SECONDS = 1.0
MAX_PEAK_MB = 150.0  # the crafted configs ask for gigabytes; reading the tiny model's own files is ~10 MB


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


def refused(load: Callable[[], object], match: str) -> tuple[float, float]:
    """Run `load`, which must raise a one-line ValueError matching `match`; (seconds, peak MB above
    the resident size before)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
    before = _peak_kb()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as err:
        load()
    seconds = time.perf_counter() - start
    peak_mb = (_peak_kb() - before) / 1024
    assert "\n" not in str(err.value)
    assert seconds < MAX_SECONDS, f"refused after {seconds:.2f} s"
    assert peak_mb < MAX_PEAK_MB, f"peak memory rose by {peak_mb:.0f} MB"
    return seconds, peak_mb


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = SYSTEM.write_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    t2i.load(folder)  # warm: imports and one-off setup (meta-device init imports torch._dynamo) not timed
    return folder


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny SD folder to craft."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def _edit(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _write_safetensors(file: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return file


# ------------------------------------------------------------------------------ 15.8: no huge allocations
@pytest.mark.parametrize(("part", "changes", "match"), [
    ("unet", {"layers_per_block": 10_000_000}, "layers_per_block=10000000 is outside"),
    ("unet", {"block_out_channels": [1_000_000_000, 64]}, "block_channels=1000000000 is outside"),
    ("unet", {"transformer_layers_per_block": 64}, "blocks but the weights hold only"),
    ("unet", {"cross_attention_dim": 4096}, "other shapes than the config gives"),
    ("vae", {"layers_per_block": 10_000_000}, "layers_per_block=10000000 is outside"),
    ("vae", {"block_out_channels": [1_000_000_000, 32]}, "block_channels=1000000000 is outside"),
    ("text_encoder", {"num_hidden_layers": 10_000_000}, "layers=10000000 is outside"),
    ("text_encoder", {"hidden_size": 1_000_000_000}, "width=1000000000 is outside"),
    ("scheduler", {"num_train_timesteps": 1_000_000_000}, "num_train_timesteps=1000000000 is outside"),
])
def test_huge_configs_are_refused_before_allocating(model, part, changes, match):
    config = model / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    _edit(config, **changes)
    refused(lambda: t2i.load(model), match)


def test_single_file_metadata_asking_for_8192_channels(model, tmp_path):
    """A small file whose t2i_sd_config metadata asks for 8192-wide levels: the config is built on the
    meta device and its shapes compared with the file's tensors before anything is allocated."""
    file = export(t2i.load(model), tmp_path / "m.safetensors")
    state = load_state_dict(file)
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["t2i_sd_config"])
    cfg["unet"]["block_channels"] = [8192, 16384]
    crafted = tmp_path / "crafted.safetensors"
    save_state_dict(state, crafted, {**meta, "t2i_sd_config": json.dumps(cfg)})
    refused(lambda: t2i.load(crafted), "other shapes than the config gives")
    assert main(["convert", str(crafted), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_the_reusable_check_on_any_module():
    """`build_checked` (for every loader: the shapes LDM too) refuses a config whose shapes are not the
    tensors', and bounds come before the build (a billion channels never reaches a constructor)."""
    from t2i.nets.unet import UNet

    with torch.device("meta"):
        tensors = UNet(TINY_UNET).state_dict()
    wide = TINY_UNET.__class__(**{**vars(TINY_UNET), "block_channels": (8192, 16384)})
    refused(lambda: build_checked(lambda: UNet(wide), {"unet": wide}, tensors, "crafted"), "other shapes")
    huge = TINY_UNET.__class__(**{**vars(TINY_UNET), "block_channels": (10**9, 64)})
    refused(lambda: build_checked(lambda: UNet(huge), {"unet": huge}, tensors, "crafted"), "is outside")
    assert build_checked(lambda: UNet(TINY_UNET), {"unet": TINY_UNET}, tensors, "ok").conv_in.weight.is_meta
    check_config(TINY_UNET, "tiny", len(tensors))  # the real config passes


# ------------------------------------------------------------------------------ 15.9: one-line errors
@pytest.mark.parametrize(("header", "match"), [
    ([1, 2, 3], "expected a JSON object, found list"),
    ("just a string", "expected a JSON object, found str"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, "malformed header entry"),
    ({"w": [0, 16]}, "malformed header entry"),
    ({"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "__metadata__"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_malformed_safetensors_headers_are_one_line_errors(tmp_path, header, match):
    file = _write_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 16)
    refused(lambda: load_state_dict(file), match)
    refused(lambda: t2i.load(file), match)


@pytest.mark.parametrize(("part", "changes", "match"), [
    ("unet", {"attention_head_dim": 0}, "num_heads=0 is outside"),
    ("unet", {"norm_num_groups": 0}, "norm_groups=0 is outside"),
    ("unet", {"norm_num_groups": 7}, "norm_groups=7 does not divide"),
    ("unet", {"block_out_channels": []}, "0 levels"),
    ("unet", {"block_out_channels": 32}, "not iterable|block_channels"),
    ("vae", {"norm_num_groups": 0}, "norm_groups=0 is outside"),
    ("text_encoder", {"num_attention_heads": 0}, "heads=0 is outside"),
    ("scheduler", {"beta_end": float("nan")}, "beta_end=nan is not a finite number"),
    ("scheduler", {"beta_start": float("inf")}, "beta_start=inf is not a finite number"),
    ("scheduler", {"trained_betas": [0.1, float("nan")]}, "trained_betas"),
])
def test_config_values_that_divide_by_zero_or_are_not_finite(model, part, changes, match):
    config = model / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    _edit(config, **changes)
    refused(lambda: t2i.load(model), match)


@pytest.mark.parametrize(("file", "content", "match"), [
    ("model_index.json", "[1, 2]", "expected a JSON object, found list"),
    ("unet/config.json", '"unet"', "expected a JSON object, found str"),
    ("scheduler/scheduler_config.json", "[]", "expected a JSON object, found list"),
    ("vae/config.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("text_encoder/config.json", "{", "malformed JSON"),
])
def test_malformed_folder_json_is_a_one_line_error(model, tmp_path, capsys, file, content, match):
    (model / file).write_text(content)
    refused(lambda: t2i.load(model), match)
    assert main(["convert", str(model), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2i convert: error: ")


@pytest.mark.parametrize("meta", ["[1]", '"x"', '{"family": "sd1"}', '{"family": "sd1", "unet": {"nope": 1}}'])
def test_malformed_single_file_metadata_is_a_one_line_error(model, tmp_path, meta):
    file = export(t2i.load(model), tmp_path / "m.safetensors")
    crafted = tmp_path / "crafted.safetensors"
    save_state_dict(load_state_dict(file), crafted, {"t2i_sd_config": meta})
    refused(lambda: t2i.load(crafted), "t2i_sd_config")


# ------------------------------------------------------------------------------ 15.10: shards stay inside
def _shard(model: Path, entries: list[str]) -> Path:
    """Replace the U-Net weights by a sharded index whose entries name `entries` in turn."""
    unet = model / "unet"
    state = load_state_dict(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: entries[i % len(entries)] for i, k in enumerate(sorted(state))}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return unet


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../x.safetensors", "../unet/../../x.safetensors",
                                   "sub/../../x.safetensors", "C:\\x.safetensors"])
def test_shard_index_entries_outside_the_folder_are_refused(model, tmp_path, entry):
    # A valid weight file outside the model folder, where "../../x.safetensors" points: loading it
    # would be reading a file the index has no business naming.
    save_state_dict(load_state_dict(model / "unet" / "diffusion_pytorch_model.safetensors"), tmp_path / "x.safetensors")
    unet = _shard(model, [entry])
    refused(lambda: find_weights(unet, "diffusion_pytorch_model"), "is not a file name inside")
    refused(lambda: t2i.load(model), "is not a file name inside")


def test_shards_inside_the_folder_load(model):
    """The control: the same index with real shards inside the folder loads the same weights."""
    reference = t2i.load(model)
    unet = model / "unet"
    state = load_state_dict(unet / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "shards/part-2.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_state_dict({k: state[k] for k in part}, unet / name)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in find_weights(unet, "diffusion_pytorch_model")] == ["part-1.safetensors",
                                                                               "part-2.safetensors"]
    loaded = t2i.load(model)
    assert all(torch.equal(a, b) for a, b in zip(reference.unet.state_dict().values(),
                                                 loaded.unet.state_dict().values(), strict=True))
