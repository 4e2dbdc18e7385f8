"""Multi-aspect buckets (t2i.train.buckets): nearest bucket, minimal crop, one bucket per batch, exact
resume, disjoint ranks; the shapes world on non-square canvases; a folder of the user's images at their
own sizes (t2i.data.folder.SizedImages: corrupt files skipped and counted, large originals reduced, the
crop where time_ids say), and `t2i train ldm --aspect-buckets --data folder`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import HashText, vae_file  # noqa: F401  (the tiny VAE fixture)

from t2i.data.folder import to_tensor
from t2i.data.shapes.rendering import render_array
from t2i.data.shapes.sampling import place_on_canvas
from t2i.data.shapes.world import MIN_GAP, gap
from t2i.train.buckets import (
    BucketedData,
    ShapesCanvases,
    aspect_buckets,
    cover_size,
    fit_to_bucket,
    nearest_bucket,
    placement,
)
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo

torch.set_num_threads(1)
BUCKETS = aspect_buckets(32, 8)


def test_buckets_have_about_equal_area_and_model_multiples():
    b64 = aspect_buckets(64, 8)
    assert (64, 64) in b64 and (48, 80) in b64 and (80, 48) in b64 and (40, 96) in b64
    for h, w in b64:
        assert h % 8 == 0 and w % 8 == 0 and abs(h * w / 64**2 - 1) < 0.1 and max(h / w, w / h) <= 2.5
    assert BUCKETS == [(48, 24), (40, 24), (32, 32), (24, 40), (24, 48)]


@pytest.mark.parametrize("h,w", [(37, 61), (85, 72), (20, 100), (64, 64), (13, 29), (200, 90)])
def test_cover_size_crops_only_what_the_bucket_needs(h, w):
    for bucket in BUCKETS:
        rh, rw = cover_size(h, w, bucket)
        assert rh >= bucket[0] and rw >= bucket[1]
        # one side is the bucket's exactly; the other is the aspect-preserving length rounded up
        assert rh == bucket[0] or rw == bucket[1]
        assert rw - w * rh / h < 1 and rh - h * rw / w < 1
        image = torch.zeros(3, h, w)
        crop, top, left = fit_to_bucket(image, bucket, torch.Generator().manual_seed(0))
        assert crop.shape == (3, *bucket) and 0 <= top <= rh - bucket[0] and 0 <= left <= rw - bucket[1]


def _data(seed=0):
    return BucketedData(ShapesCanvases(seed, 32), BUCKETS, seed)


def test_each_batch_is_one_bucket_and_every_image_its_nearest():
    data, src = _data(), ShapesCanvases(0, 32)
    seen = set()
    for k in range(4):
        x, captions, idx = data.batch(4 * k, 4, DistInfo())
        bucket = tuple(x.shape[2:])
        seen.add(bucket)
        assert len(captions) == 4 and len(set(idx)) == 4
        for h, w in src.sizes(np.asarray(idx)).tolist():
            assert BUCKETS[nearest_bucket(BUCKETS, h, w)] == bucket
        ids = data.time_ids(4 * k, 4, DistInfo())
        assert ids[:, 4:].tolist() == [list(bucket)] * 4
        assert torch.equal(ids[:, :2], torch.tensor(src.sizes(np.asarray(idx)), dtype=torch.float32))
    assert len(seen) >= 2  # the stream really spans several aspect ratios


def test_resume_rebuilds_the_same_batches_and_ranks_are_disjoint():
    walked = _data()
    for k in range(6):
        walked.batch(8 * k, 8, DistInfo())
    fresh = _data()  # a resumed run: nothing but the position
    a, b = walked.batch(48, 8, DistInfo()), fresh.batch(48, 8, DistInfo())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert torch.equal(walked.time_ids(48, 8, DistInfo()), fresh.time_ids(48, 8, DistInfo()))
    r0 = fresh.batch(48, 4, DistInfo(rank=0, world_size=2))
    r1 = fresh.batch(48, 4, DistInfo(rank=1, world_size=2))
    assert not set(r0[2]) & set(r1[2]) and r0[2] + r1[2] == a[2]
    assert torch.equal(torch.cat([r0[0], r1[0]]), a[0])
    with pytest.raises(ValueError, match="multiple of the global batch"):
        fresh.batch(3, 8, DistInfo())


class _Sized:
    """A finite SizedSource of blank images with fixed sizes."""

    def __init__(self, sizes):
        self.length, self._sizes = len(sizes), np.asarray(sizes)

    def sizes(self, indices):
        return self._sizes[np.asarray(indices)]

    def __getitem__(self, i):
        h, w = self._sizes[i]
        return torch.full((3, int(h), int(w)), float(i)), str(i)


def test_finite_source_uses_each_item_at_most_once_per_epoch():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 80, (200, 2))]
    data = BucketedData(_Sized(sizes), BUCKETS, seed=1)
    used = [i for k in range(10) for i in data.batch(4 * k, 4, DistInfo())[2]]
    assert len(used) == len(set(used)) == 40  # 40 < 200: all within the first epoch
    x, captions, idx = data.batch(0, 4, DistInfo())
    assert [int(c) for c in captions] == idx and all(
        torch.allclose(x[j], torch.full_like(x[j], float(i)), atol=1e-3) for j, i in enumerate(idx))


def test_shapes_on_non_square_canvases_keep_the_world_rules():
    src = ShapesCanvases(3, 64)
    for i in range(8):
        image, caption = src[i]
        h, w = src.sizes(np.asarray([i]))[0]
        assert image.shape == (3, h, w) and caption
    from t2i.data.shapes.datasets import shapes_example

    scene, _ = shapes_example(0, 5)
    wide = place_on_canvas(scene, 96, 43)
    if wide is not None:
        for a, o in zip(scene.objects, wide.objects, strict=True):
            assert o.s == a.s and abs(o.centre[0] / 96 - a.centre[0] / 64) < 0.02
            assert 0 <= o.x <= 96 - o.s and 0 <= o.y <= 43 - o.s
        assert all(gap(a, b) >= MIN_GAP for j, a in enumerate(wide.objects) for b in wide.objects[:j])
        assert render_array(wide, 64, (96, 43)).shape == (43, 96, 3)
    assert math.isclose(render_array(scene, 32, (64, 64)).mean(), render_array(scene, 32).mean())


def test_center_crop_baseline_is_square_and_centred():
    data = BucketedData(ShapesCanvases(0, 32), [(32, 32)], 0, center=True)
    src = ShapesCanvases(0, 32)
    x, _, idx = data.batch(0, 4, DistInfo())
    assert x.shape == (4, 3, 32, 32)
    for (h, w), (oh, ow, top, left, _, _) in zip(src.sizes(np.asarray(idx)).tolist(),
                                                 data.time_ids(0, 4, DistInfo()).tolist(), strict=True):
        rh, rw = cover_size(h, w, (32, 32))
        assert (oh, ow) == (h, w) and (top, left) == ((rh - 32) // 2, (rw - 32) // 2)
    assert any(v > 0 for v in data.time_ids(0, 4, DistInfo())[:, 2:4].flatten().tolist())


def test_zoom_crops_enlarged_images_at_random_and_time_ids_say_where():
    """--crop-zoom: a share of the images is enlarged up to the factor and cropped at a random offset;
    the batch's pixels are exactly that crop of the resized original, and time_ids give its top-left."""
    zoomed = BucketedData(ShapesCanvases(0, 32), BUCKETS, 0, zoom=(0.5, 1.6))
    plain, src = _data(), ShapesCanvases(0, 32)
    offsets, enlarged, n = [], 0, 0
    for k in range(6):
        x, _, idx = zoomed.batch(8 * k, 8, DistInfo())
        assert idx == plain.batch(8 * k, 8, DistInfo())[2]  # zoom changes crops, not which items share a batch
        ids = zoomed.time_ids(8 * k, 8, DistInfo())
        bucket = tuple(x.shape[2:])
        for row, i, crop in zip(ids.tolist(), idx, x, strict=True):
            (rh, rw), top, left = placement((int(row[0]), int(row[1])), bucket, zoomed._crop_generator(i), zoomed.zoom)
            assert (top, left) == (row[2], row[3]) and rh >= bucket[0] and rw >= bucket[1]
            cover = cover_size(int(row[0]), int(row[1]), bucket)
            enlarged += (rh, rw) != cover
            n += 1
            offsets.append(max(top, left))
            image = src[i][0]
            resized = F.interpolate(image[None], (rh, rw), mode="bilinear", antialias=True, align_corners=False)[0]
            assert torch.equal(crop, resized[:, top:top + bucket[0], left:left + bucket[1]])
    assert 0.3 < enlarged / n < 0.7  # about the share asked for
    assert max(offsets) >= 6  # crops far larger than bucketing's excess of a pixel or two
    fresh = BucketedData(ShapesCanvases(0, 32), BUCKETS, 0, zoom=(0.5, 1.6))  # a resumed run
    assert torch.equal(fresh.batch(40, 8, DistInfo())[0], zoomed.batch(40, 8, DistInfo())[0])
    with pytest.raises(ValueError, match="centre crops"):
        BucketedData(ShapesCanvases(0, 32), [(32, 32)], 0, center=True, zoom=(0.5, 1.6))
    with pytest.raises(ValueError, match="factor"):
        BucketedData(ShapesCanvases(0, 32), BUCKETS, 0, zoom=(0.5, 0.9))


# A user's folder: (height, width) of each image, by file name; 07 is not an image at all, 08 a PNG cut in
# half (its header reads, its pixels do not), 06 large enough to be reduced when read.
FOLDER = {"00": (32, 32), "01": (20, 44), "02": (44, 20), "03": (30, 50), "04": (50, 30), "05": (40, 40),
          "06": (240, 480), "07": None, "08": (36, 60), "09": (48, 24), "10": (26, 40), "11": (60, 36)}
ZOOM = (0.5, 1.6)


def _smooth(h: int, w: int, k: int) -> np.ndarray:
    """(h, w, 3) uint8: ramps across and down plus a block, different for each k (smooth, so that
    resampling a reduced read and the original agree to a few levels)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x / w, 255 * y / h, np.full((h, w), 20.0 * k)], -1)
    arr[h // 4:h // 2, w // 3:w // 2] = (255 - 20 * k, 40, 200)
    return arr.astype(np.uint8)


def _write_folder(folder):
    import io

    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, size) in enumerate(FOLDER.items()):
        (folder / f"{name}.txt").write_text(f"image {name}")
        if size is None:
            (folder / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
            continue
        image = Image.fromarray(_smooth(*size, k))
        if name == "08":
            buf = io.BytesIO()
            image.save(buf, "PNG")
            (folder / f"{name}.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        else:
            image.save(folder / f"{name}.png")
    return folder


def _folder_data(folder, log=print):
    return open_data("folder", str(folder), 32, seed=0, log=log, size_multiple=8, crop_zoom=ZOOM)


def test_folder_images_share_a_bucket_per_batch_and_time_ids_say_where_the_crop_is(tmp_path):
    messages = []
    data = _folder_data(_write_folder(tmp_path / "data"), messages.append)
    src = data.source
    assert data.buckets == BUCKETS and src.length == 12
    # sizes from the headers: the true size, also of the image reduced when read (2x: its short side 240
    # stays >= 2 * 32 * 1.6); the unreadable 07 stands in as 08, the next whose header reads
    assert src.sizes(np.arange(12)).tolist() == [list(FOLDER[f"{i:02d}"] or FOLDER["08"]) for i in range(12)]
    assert src[6][0].shape == (3, 120, 240)
    full = {name: to_tensor(Image.fromarray(_smooth(*size, k))) for k, (name, size) in enumerate(FOLDER.items())
            if size is not None}
    captions, buckets, worst_reduced, crops = set(), set(), 0.0, []
    for pos in range(0, 48, 2):  # 24 batches of 2: four epochs of the 12 items
        x, caps, idx = data.batch(pos, 2, DistInfo())
        ids = data.time_ids(pos, 2, DistInfo())
        bucket = tuple(x.shape[2:])
        buckets.add(bucket)
        captions |= set(caps)
        assert ids[:, 4:].tolist() == [list(bucket)] * 2
        for j, i in enumerate(idx):
            name = f"{i:02d}"
            h, w, top, left = (int(v) for v in ids[j, :4])
            assert BUCKETS[nearest_bucket(BUCKETS, h, w)] == bucket
            if name in ("07", "08"):  # unreadable: a stand-in fitted to 08's header size, placed as that says
                assert (h, w) == FOLDER["08"] and caps[j] == "image 09"
                continue
            assert (h, w) == FOLDER[name] and caps[j] == f"image {name}"
            # the crop is the one time_ids describe, on the original at its true size
            (rh, rw), t, lft = placement((h, w), bucket, data._crop_generator(i), ZOOM)
            assert (t, lft) == (top, left)
            crops.append(max(top, left))
            want = F.interpolate(full[name][None], (rh, rw), mode="bilinear", antialias=True,
                                 align_corners=False)[0, :, top:top + bucket[0], left:left + bucket[1]]
            if name == "06":  # read at half size: the same crop from fewer pixels
                worst_reduced = max(worst_reduced, (x[j] - want).abs().max().item())
            else:
                assert torch.equal(x[j], want)
    good = {f"image {n}" for n, size in FOLDER.items() if size is not None and n != "08"}
    assert captions == good  # every readable image used, the two unreadable ones never
    assert set(src.skipped) == {str(tmp_path / "data" / "07.png"), str(tmp_path / "data" / "08.png")}
    assert sum("skipping unreadable image" in m for m in messages) == 2
    print(f"buckets used {sorted(buckets)}, skipped {len(src.skipped)}, largest crop offset {max(crops)}, "
          f"reduced read vs original {worst_reduced:.4f}")
    assert len(buckets) == 5 and max(crops) >= 4 and worst_reduced < 0.05
    with pytest.raises(ValueError, match="not --data webdataset"):
        open_data("webdataset", str(tmp_path), 32, 0, size_multiple=8)


def test_folder_buckets_resume_exactly(tmp_path):
    folder = _write_folder(tmp_path / "data")
    walked = _folder_data(folder)
    for pos in range(0, 30, 2):
        walked.batch(pos, 2, DistInfo())
    fresh = _folder_data(folder)  # a resumed run: nothing but the position (and the files)
    for pos in (30, 32, 50):
        (a, ca, ia), (b, cb, ib) = walked.batch(pos, 2, DistInfo()), fresh.batch(pos, 2, DistInfo())
        assert torch.equal(a, b) and ca == cb and ia == ib
        assert torch.equal(walked.time_ids(pos, 2, DistInfo()), fresh.time_ids(pos, 2, DistInfo()))
    r0, r1 = (fresh.batch(32, 1, DistInfo(rank=r, world_size=2)) for r in (0, 1))
    assert r0[2] + r1[2] == walked.batch(32, 2, DistInfo())[2]


def test_ldm_trains_on_a_bucketed_folder_with_its_time_ids(tmp_path, vae_file, monkeypatch):  # noqa: F811
    """`t2i train ldm --aspect-buckets --micro-conditioning --data folder`: the U-Net sees non-square
    latents and the batch's own time ids."""
    from t2i.nets.unet import UNet
    from t2i.train.ldm import LDMTrainConfig, train_ldm

    seen, forward = [], UNet.forward

    def recording(self, x, t, *args, **kwargs):
        seen.append((tuple(x.shape[2:]), kwargs.get("time_ids")))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    folder = _write_folder(tmp_path / "data")
    cfg = LDMTrainConfig(out=str(tmp_path / "run"), vae_path=vae_file, unet_preset="tiny", image_size=32,
                         batch_size=2, steps=3, lr=1e-3, warmup=1, ckpt_every=1000, image_every=0,
                         export_every=10_000, log_every=1, data="folder", data_path=str(folder),
                         aspect_buckets=True, micro_conditioning=True)
    assert train_ldm(cfg, text_encoder=HashText()) == 0
    data = open_data("folder", str(folder), 32, seed=0, size_multiple=8)  # the run's own data (seed 0)
    want = [data.time_ids(2 * k, 2, DistInfo()) for k in range(3)]
    print("ldm steps saw latents", [shape for shape, _ in seen[:3]], "time ids", [w.tolist() for w in want])
    assert [shape for shape, _ in seen[:3]] == [(int(w[0, 4]) // 4, int(w[0, 5]) // 4) for w in want]
    assert all(torch.equal(ids, w) for (_, ids), w in zip(seen[:3], want, strict=True))
    assert any(h != w for h, w in (shape for shape, _ in seen[:3]))
    assert "nan" not in (tmp_path / "run" / "log.txt").read_text().lower()
