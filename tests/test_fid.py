"""FID / IS / KID / precision-recall formulas against pytorch-fid and torch-fidelity on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fid_oracles import oracles

from t2i.eval import fid


def _features(seed: int, n: int = 120, d: int = 32, shift: float = 0.0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    mix = rng.randn(d, d) / np.sqrt(d)  # correlated features, like real embeddings
    return rng.randn(n, d) @ mix + shift


def test_frechet_distance_matches_pytorch_fid_and_torch_fidelity() -> None:
    o = oracles()
    a, b = _features(0), _features(1, shift=0.3)
    mu1, s1 = fid.feature_statistics(a)
    mu2, s2 = fid.feature_statistics(b)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    ref = float(o.calculate_frechet_distance(mu1, s1, mu2, s2))
    ref_tf = o.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    print(f"FID ours {ours!r} pytorch-fid {ref!r} torch-fidelity {ref_tf['frechet_inception_distance']!r}")
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours == pytest.approx(ref_tf["frechet_inception_distance"], rel=1e-6)
    assert ours > 1.0  # the shift alone adds 32 * 0.09 = 2.9
    fast = fid.frechet_distance(mu1, s1, mu2, s2, method="eigvals")
    assert fast == pytest.approx(ref_tf["frechet_inception_distance"], rel=1e-9)
    assert fast == pytest.approx(ours, rel=1e-6)
    # Statistics as pytorch-fid computes them: np.mean and np.cov(rowvar=False).
    np.testing.assert_array_equal(s1, np.cov(a, rowvar=False))
    assert fid.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_singular_covariances_match_pytorch_fid() -> None:
    """Fewer samples than dimensions: both add eps to the diagonal and agree."""
    o = oracles()
    a, b = _features(2, n=10, d=32), _features(3, n=10, d=32, shift=0.1)
    stats = (*fid.feature_statistics(a), *fid.feature_statistics(b))
    assert fid.frechet_distance(*stats) == pytest.approx(float(o.calculate_frechet_distance(*stats)), rel=1e-6)


def test_stats_npz_round_trip_in_pytorch_fid_layout(tmp_path) -> None:
    mu, sigma = fid.feature_statistics(_features(4))
    path = tmp_path / "stats.npz"
    fid.save_stats(path, mu, sigma)
    with np.load(path) as f:  # read the way pytorch-fid reads a stats file
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    mu2, sigma2 = fid.load_stats(path)
    np.testing.assert_array_equal(sigma2, sigma)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(KeyError, match="'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")


@pytest.mark.parametrize("shuffle", [False, True])
def test_inception_score_matches_torch_fidelity(shuffle: bool) -> None:
    o = oracles()
    logits = np.random.RandomState(5).randn(200, 50) * 3
    mean, std = fid.inception_score(logits, splits=10, shuffle_seed=2020 if shuffle else None)
    ref = o.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=shuffle, rng_seed=2020)
    print(f"IS ours {mean!r} +- {std!r}; torch-fidelity {ref}")
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-6)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-6)
    assert 1.0 < mean < 50.0


def test_inception_score_limits() -> None:
    """Confident and uniform over C classes gives C; identical predictions give 1."""
    c = 8
    confident = np.tile(np.eye(c) * 100, (5, 1))  # (40, 8), each class equally often
    assert fid.inception_score(confident, splits=1)[0] == pytest.approx(c, rel=1e-6)
    assert fid.inception_score(np.zeros((40, c)), splits=2)[0] == pytest.approx(1.0, abs=1e-12)


def test_kid_matches_torch_fidelity() -> None:
    o = oracles()
    a, b = _features(6, n=60), _features(7, n=50, shift=0.2)
    ours = fid.kernel_inception_distance(a, b, subsets=20, subset_size=40, seed=2020)
    ref = o.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20,
                                   kid_subset_size=40, rng_seed=2020, verbose=False)
    print(f"KID ours {ours}; torch-fidelity {ref}")
    assert ours[0] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-6)
    assert ours[1] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-6)
    assert ours[0] > 0


def test_precision_recall_matches_torch_fidelity() -> None:
    o = oracles()
    gen, real = _features(8, n=70), _features(9, n=80, shift=0.5)
    ours = fid.precision_recall(gen, real, k=3)
    ref = o.calculate_precision_recall_full(torch.from_numpy(gen), torch.from_numpy(real), neighborhood=3)
    print(f"precision/recall ours {ours}; torch-fidelity {ref}")
    assert ours == pytest.approx(ref, abs=1e-6)  # torch-fidelity averages in float32; one sample moves 1/80
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0
