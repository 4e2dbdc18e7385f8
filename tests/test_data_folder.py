"""Image folders with .txt sidecars and JSONL manifests: items, captions, resizing, and a corrupt
image skipped, counted and named (also through a real `t2i train autoencoder` run); a
decompression bomb skipped like any unreadable image (through a run and its --resume too); a
caption file that is not UTF-8 leaves its image out, named."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.folder import image_folder, jsonl_manifest, load_image


def _write(tmp_path, name: str, rgb: tuple[int, int, int], size=(24, 16), caption: str | None = None) -> None:
    Image.new("RGB", size, rgb).save(tmp_path / name)
    if caption is not None:
        (tmp_path / name).with_suffix(".txt").write_text(caption + "\n")


def test_load_image_resizes_short_side_and_center_crops(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 5:35] = 255  # a white band; the center crop (columns 10..30) lies inside it
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 10)
    assert x.shape == (3, 10, 10)
    assert torch.allclose(x, torch.ones_like(x), atol=0.02)  # [-1, 1] range, white -> 1


def test_folder_with_a_corrupt_image_is_skipped_counted_and_named(tmp_path):
    _write(tmp_path, "a.png", (255, 0, 0), caption="a red square")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "b.txt").write_text("broken")
    _write(tmp_path, "c.png", (0, 0, 255), caption="a blue square")
    _write(tmp_path, "d.png", (0, 255, 0))  # no sidecar: empty caption
    messages: list[str] = []
    ds = image_folder(tmp_path, 8, messages.append)
    assert len(ds) == 4
    assert any("no .txt caption" in m for m in messages)
    x0, c0 = ds[0]
    assert c0 == "a red square" and x0.shape == (3, 8, 8)
    assert torch.allclose(x0[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    x1, c1 = ds[1]  # b.png is broken: the next readable item takes its place
    assert c1 == "a blue square" and torch.allclose(x1[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    assert ds[3][1] == ""
    assert list(ds.skipped) == [str(tmp_path / "b.png")]
    named = [m for m in messages if "b.png" in m]
    assert len(named) == 1 and "1 skipped so far" in named[0]
    ds[1]  # met again: still counted once, not logged again
    assert len(ds.skipped) == 1 and len([m for m in messages if "b.png" in m]) == 1


def test_jsonl_manifest_and_its_errors(tmp_path):
    _write(tmp_path, "a.png", (255, 255, 0))
    lines = [json.dumps({"image": "a.png", "text": "a yellow square"}), "",
             json.dumps({"image": str(tmp_path / "missing.png"), "text": "gone"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    messages: list[str] = []
    ds = jsonl_manifest(tmp_path / "m.jsonl", 4, messages.append)
    assert len(ds) == 2
    assert ds[0][1] == "a yellow square"
    assert ds[1][1] == "a yellow square" and len(ds.skipped) == 1  # the missing file is skipped
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        jsonl_manifest(tmp_path / "bad.jsonl", 4)
    with pytest.raises(FileNotFoundError):
        jsonl_manifest(tmp_path / "nope.jsonl", 4)


def _three_images(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _write(data, f"{i}.png", rgb, size=(16, 16), caption=f"image {i}")
    return data


def _train_on(data, out, *extra: str) -> None:
    """`t2i train autoencoder` (tiny, 16x16, batch 4) on the folder `data`; it must succeed."""
    run = subprocess.run([sys.executable, "-m", "t2i.cli", "train", "autoencoder", "--out", str(out),
                          "--preset", "tiny", "--data", "folder", "--data-path", str(data), "--image-size", "16",
                          "--batch-size", "4", "--image-every", "0", "--threads", "1", *extra],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_training_on_a_folder_with_a_corrupt_image_does_not_crash(tmp_path):
    data = _three_images(tmp_path)
    (data / "3.png").write_bytes(b"garbage")
    _train_on(data, tmp_path / "ae", "--steps", "3", "--ckpt-every", "3")
    log = (tmp_path / "ae" / "log.txt").read_text()
    assert "skipping unreadable image" in log and "3.png" in log
    assert (tmp_path / "ae" / "checkpoints" / "step_00000003.safetensors").is_file()

def _bomb(path) -> None:
    """A 20000x20000 RGB PNG as far as its header goes (PIL refuses it at open, from the header:
    400 megapixels is over twice its limit), so the test needs no 1.2 GB of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_skipped_and_non_utf8_caption_leaves_its_image_out(tmp_path):
    _write(tmp_path, "a.png", (255, 0, 0), caption="a red square")
    _bomb(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("huge")
    _write(tmp_path, "c.png", (0, 0, 255))
    (tmp_path / "c.txt").write_bytes("un carr\xe9 bleu".encode("latin-1"))  # not UTF-8
    _write(tmp_path, "d.png", (0, 255, 0), caption="a green square")
    messages: list[str] = []
    ds = image_folder(tmp_path, 8, messages.append)
    assert len(ds) == 3 and [p.name for p, _ in ds.items] == ["a.png", "b.png", "d.png"]  # c.png is left out
    named = [m for m in messages if "c.txt" in m]
    assert len(named) == 1 and "UTF-8" in named[0] and "c.png" in named[0]
    x1, c1 = ds[1]  # the bomb: skipped, the next readable item takes its place
    assert c1 == "a green square" and torch.allclose(x1[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert list(ds.skipped) == [str(tmp_path / "b.png")] and "DecompressionBomb" in ds.skipped[str(tmp_path / "b.png")]
    # a manifest that is not UTF-8 is an error naming it, not a traceback from the decoder
    (tmp_path / "m.jsonl").write_bytes(b'{"image": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl: the manifest is not UTF-8"):
        jsonl_manifest(tmp_path / "m.jsonl", 4)


def test_training_and_resume_on_a_folder_with_a_decompression_bomb(tmp_path):
    data = _three_images(tmp_path)
    _bomb(data / "3.png")
    (data / "4.png").write_bytes(b"garbage")
    (data / "4.txt").write_bytes(b"\xff\xfe not utf-8")
    _train_on(data, tmp_path / "ae", "--steps", "2", "--ckpt-every", "1")  # every step reads the bomb
    _train_on(data, tmp_path / "ae", "--steps", "3", "--resume")
    log = (tmp_path / "ae" / "log.txt").read_text()
    # each run opens the folder twice (the training stream and the grid's fixed batch), each names them once
    assert log.count("skipping unreadable image") == 4 and log.count("3.png (DecompressionBombError") == 4
    assert log.count("4.txt cannot be read as UTF-8") == 4
    assert (tmp_path / "ae" / "checkpoints" / "step_00000003.safetensors").is_file()
