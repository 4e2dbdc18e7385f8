"""Nothing in a checkpoint runs, and files that lie are refused with a clear error (issue 3).

Pickles (`.ckpt`/`.pt`/`.bin`) are only opened with `torch.load(weights_only=True)`; a pickle
whose `__reduce__` would create a file must be refused, naming the file, and the marker file
must never appear: both as a raw pickle and inside a `torch.save` zip. safetensors headers
that point past the end of the file or give sizes that do not match are refused before any
tensor is read, as are weights holding NaN or Inf. Every entry point (io, the single-file
loader, `t2i.load`, `t2i convert`) goes through the same checks.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import t2i
from t2i.checkpoints.io import CheckpointError, load_state_dict
from t2i.checkpoints.single_file import load_single_file
from t2i.cli import main


class CreatesFile:
    """Unpickling this calls Path.touch(marker): code execution if a loader runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload(marker: Path) -> dict:
    # the call comes first in the stream, before any tensor the loader might stop at
    return {"boom": CreatesFile(marker), "state_dict": {"model.diffusion_model.out.2.weight": torch.ones(2, 2)}}


def test_the_payload_really_creates_the_file(tmp_path):
    """Control: an unsafe loader would run it (so the refusals below mean something)."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_raw_pickle_with_reduce_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    file = tmp_path / f"evil{suffix}"
    file.write_bytes(pickle.dumps(_payload(marker), protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_state_dict(file)
    message = str(err.value)
    assert str(file) in message and "refused to load a pickle" in message
    assert "getattr" in message  # the global it wanted (Path.touch is reached through getattr)
    assert "add_safe_globals" not in message  # no advice to allowlist it
    assert not marker.exists()


def test_torch_save_zip_with_reduce_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "evil.ckpt"
    torch.save(_payload(marker), file)  # the zip format torch.save writes today
    assert file.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(CheckpointError, match="refused to load a pickle") as err:
        load_state_dict(file)
    assert str(file) in str(err.value)
    assert not marker.exists()
    # through every entry point too
    for load in (load_single_file, t2i.load):
        with pytest.raises(CheckpointError):
            load(file)
    assert main(["convert", str(file), str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_plain_tensor_ckpt_is_read(tmp_path):
    """The safe path still works: a torch.save of tensors nested under state_dict."""
    file = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a": torch.arange(4.0)}, "global_step": 3}, file)
    assert torch.equal(load_state_dict(file)["a"], torch.arange(4.0))


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_header_offset_past_end_is_refused(tmp_path):
    file = tmp_path / "lie.safetensors"
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    file.write_bytes(_safetensors_bytes(header, b"\0" * 8))  # only 8 of the 16 bytes exist
    with pytest.raises(CheckpointError, match="points past the end of the file") as err:
        load_state_dict(file)
    assert str(file) in str(err.value) and "'w'" in str(err.value)


def test_header_wrong_size_is_refused(tmp_path):
    file = tmp_path / "lie.safetensors"
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}  # 3 floats are 12 bytes
    file.write_bytes(_safetensors_bytes(header, b"\0" * 16))
    with pytest.raises(CheckpointError, match="holds 16 bytes but its dtype and shape need 12"):
        load_state_dict(file)


def test_header_length_past_end_is_refused(tmp_path):
    file = tmp_path / "lie.safetensors"
    file.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000 exceeds the file size"):
        load_state_dict(file)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    file = tmp_path / "nan.safetensors"
    w = torch.zeros(3, 3)
    w[1, 2] = bad
    save_file({"model.diffusion_model.out.2.weight": w, "ok": torch.ones(2)}, file)
    with pytest.raises(CheckpointError, match="'model.diffusion_model.out.2.weight' contains NaN or Inf") as err:
        t2i.load(file)
    assert str(file) in str(err.value)


def test_non_finite_in_pickle_is_refused(tmp_path):
    file = tmp_path / "nan.ckpt"
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, file)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_state_dict(file)


def test_not_an_sd_checkpoint_is_a_clear_error(tmp_path):
    file = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.ones(2)}, file)
    with pytest.raises(CheckpointError, match="not a Stable Diffusion single-file checkpoint"):
        t2i.load(file)
