"""Multi-aspect buckets (t2i.train.buckets): nearest bucket, minimal crop, one bucket per batch, exact
resume, disjoint ranks; the shapes world on non-square canvases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t2i.data.shapes.rendering import render_array
from t2i.data.shapes.sampling import place_on_canvas
from t2i.data.shapes.world import MIN_GAP, gap
from t2i.train.buckets import BucketedData, ShapesCanvases, aspect_buckets, cover_size, fit_to_bucket, nearest_bucket
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
    import torch.nn.functional as F

    from t2i.train.buckets import placement

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
