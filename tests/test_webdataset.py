"""WebDataset tar shards: `t2i data shapes --format webdataset` writes them; training reads them as a
stream split over ranks and loader workers, resumes at the exact sample, and skips (and counts) a
corrupt member."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import HashText, _ldm_cfg
from test_train import vae_file as vae_file  # noqa: F401  (a fixture: the tiny LDM's VAE)

from t2i.data.shapes import shapes_example
from t2i.data.webdataset import WebDatasetSource, count_samples
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.ldm import train_ldm

N, SHARD = 24, 4  # six shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from t2i.cli import main

    out = tmp_path_factory.mktemp("wds")
    assert main(["data", "shapes", "--n", str(N), "--size", "16", "--format", "webdataset",
                 "--shard-size", str(SHARD), "--out", str(out)]) == 0
    return out


def _keys(src: WebDatasetSource, positions: range, batch: int, info: DistInfo) -> list[str]:
    return [s.key for p in positions for s in src.samples(p, batch, info)]


def test_shards_hold_the_shapes_world(shards):
    names = sorted(p.name for p in shards.iterdir())
    assert names == [f"shard-{i:06d}.tar" for i in range(N // SHARD)]
    with tarfile.open(shards / "shard-000001.tar") as tar:
        members = tar.getnames()
        assert members[:3] == ["000004.json", "000004.png", "000004.txt"]
        caption = tar.extractfile("000004.txt").read().decode()
        scene = json.loads(tar.extractfile("000004.json").read())
    assert caption == shapes_example(0, 4)[1] == scene["text"] and scene["objects"]
    assert count_samples(str(shards / "shard-000001.tar")) == SHARD


def test_ranks_and_loader_workers_read_disjoint_shards(shards):
    pattern = str(shards / "shard-{000000..000005}.tar")
    epoch = {}
    for rank in (0, 1):
        src = WebDatasetSource(pattern, 16, seed=3, workers=2)
        epoch[rank] = _keys(src, range(0, 12, 6), 3, DistInfo(rank, 2))  # 6 samples of each rank
    assert not set(epoch[0]) & set(epoch[1])  # two ranks never see the same sample
    for rank in (0, 1):  # a rank's stream alternates between its two workers, each on shards of its own
        shards_of = [{k.split(":")[0] for k in epoch[rank][w::2]} for w in (0, 1)]
        assert not shards_of[0] & shards_of[1]
    with pytest.raises(ValueError, match="cannot be split"):  # 8 slots for 6 shards
        WebDatasetSource(pattern, 16, seed=3, workers=4).samples(0, 1, DistInfo(0, 2))


@pytest.mark.parametrize("workers, epoch", [(0, 12), (2, 16)])
def test_a_fresh_source_at_any_position_continues_the_stream_exactly(shards, workers, epoch):
    # Rank 0 of 2 holds 3 of the 6 shards (12 samples) in one stream, or 2 + 2 (16) with two workers.
    info = DistInfo(0, 2)
    stream = _keys(WebDatasetSource(str(shards), 16, 0, workers), range(0, 80, 4), 2, info)  # past two epochs
    assert len(set(stream[:epoch])) == epoch and set(stream) == set(stream[:epoch])
    assert stream[epoch:2 * epoch] != stream[:epoch]  # a new shard order each epoch
    for position in (6, 14, 2 * epoch + 10):  # mid-shard (rank-local 3, 7), and into the second epoch
        resumed = _keys(WebDatasetSource(str(shards), 16, 0, workers), range(position, 80, 4), 2, info)
        assert resumed[:40 - position // 2] == stream[position // 2:]


def _png(shards: Path, key: str) -> bytes:
    with tarfile.open(shards / "shard-000000.tar") as tar:
        return tar.extractfile(f"{key}.png").read()


def test_a_corrupt_member_is_skipped_and_counted(shards, tmp_path):
    import webdataset as wds

    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "shard-000000.tar")) as sink:
        for i in range(4):
            png = b"\x89PNG not really" if i == 1 else _png(shards, f"{i:06d}")
            sink.write({"__key__": f"{i:06d}", "png": png, "txt": f"caption {i}"})
    messages: list[str] = []
    src = WebDatasetSource(str(bad), 16, 0, 0, log=messages.append)
    images, captions, _ = src.batch(0, 4, DistInfo())
    # Sample 1 is replaced by the next readable one (2), so every later position keeps its sample.
    assert captions == ["caption 0", "caption 2", "caption 2", "caption 3"]
    assert torch.equal(images[1], images[2]) and not torch.equal(images[0], images[1])
    assert list(src.skipped) == ["shard-000000.tar:000001"]
    assert len(messages) == 1 and "skipping unreadable sample shard-000000.tar:000001" in messages[0]
    assert "1 skipped so far" in messages[0]
    again = WebDatasetSource(str(bad), 16, 0, 0, log=messages.append)
    assert again.batch(2, 2, DistInfo())[1] == captions[2:]  # resumed past it: the same samples, no new report
    assert len(messages) == 1


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}.safetensors")


def test_a_run_on_shards_resumes_at_the_exact_sample(shards, tmp_path, vae_file):
    # 6 steps of 4 samples over 24 samples in 6 shards read by 2 loader workers: the resume at step 3 is in
    # the middle of a shard.
    def cfg(out: Path, steps: int):
        return _ldm_cfg(out, vae_file, data="webdataset", data_path=str(shards / "shard-{000000..000005}.tar"),
                        data_workers=2, batch_size=4, steps=steps, ckpt_every=3, keep=10)

    assert train_ldm(cfg(tmp_path / "full", 6), text_encoder=HashText()) == 0
    assert train_ldm(cfg(tmp_path / "split", 3), text_encoder=HashText()) == 0
    assert train_ldm(cfg(tmp_path / "split", 6), resume=True, text_encoder=HashText()) == 0
    assert "resumed from" in (tmp_path / "split" / "log.txt").read_text()
    a, b = _weights(tmp_path / "full", 6), _weights(tmp_path / "split", 6)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # --data-workers reaches the run's training source only; data opened elsewhere reads without workers.
    assert open_data("webdataset", str(shards), 16, 0).workers == 0
