"""Distribution metrics on Inception features: FID, IS, KID, precision/recall.

Every function takes feature arrays, so the same code measures FID Inception features
(`t2i.eval.inception.extract_features`) or any other embedding (a shapes CLIP's "shapes FID").
Statistics files are pytorch-fid's `.npz` with `mu` (D,) and `sigma` (D, D); clean-fid's
reference statistics use the same two keys, so both load.

- FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the matrix square
  root by scipy's `sqrtm` as pytorch-fid computes it (eps on the diagonal if the product is
  singular, the imaginary round-off dropped).
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
  random subsets (the subsets drawn as torch-fidelity draws them, so a seed reproduces its value).
- Precision/recall (Kynkaanniemi et al. 2019): k-nearest-neighbour balls around each set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features: (N, D) -> (mu (D,), sigma (D, D)) in float64, sigma the unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Matrix square root: scipy's Schur-based sqrtm (the standard FID path)."""
    try:
        from scipy import linalg
    except ImportError as e:
        raise ImportError("the FID matrix square root needs scipy: pip install scipy") from e
    return linalg.sqrtm(a)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D).

    method "sqrtm": Tr((S1 S2)^(1/2)) from scipy's sqrtm, pytorch-fid's path (the standard).
    "eigvals": the same trace as the sum of the square roots of the eigenvalues of S1 S2,
    torch-fidelity's path: about 3x faster at D = 2048 (18 s against 59 s on a loaded 2-core
    machine), agreeing to ~1e-12 relative on well-conditioned statistics.
    """
    if method not in ("sqrtm", "eigvals"):
        raise ValueError(f"method must be 'sqrtm' or 'eigvals', got {method!r}")
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigvals":
        eig = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).real.sum())
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions): regularize both covariances.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write pytorch-fid's statistics file: an `.npz` holding `mu` (D,) and `sigma` (D, D)."""
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read `mu`, `sigma` from a pytorch-fid / clean-fid `.npz`."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise KeyError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(f.files)}")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10, shuffle_seed: int | None = None) -> tuple[float, float]:
    """IS from (N, C) classifier logits (for the FID Inception: `logits_unbiased`, as the
    original code takes the softmax of pool_3 @ W without the bias).

    The N samples are cut into `splits` consecutive chunks (after a permutation by
    `np.random.RandomState(shuffle_seed)` if given; torch-fidelity shuffles with 2020).
    Returns (mean, std) of exp(mean_x KL(p(y|x) || p(y))) over the chunks.
    """
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot make {splits} splits")
    if shuffle_seed is not None:
        x = x[np.random.RandomState(shuffle_seed).permutation(n)]
    log_p = _log_softmax(x)  # (N, C)
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits : (i + 1) * n // splits]  # (n_i, C)
        p = np.exp(lp)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))  # (1, C) log p(y)
        scores.append(np.exp((p * (lp - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 estimate from (m, m) kernel matrices (diagonals of k_xx, k_yy excluded)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
                              coef0: float = 1.0, seed: int = 2020) -> tuple[float, float]:
    """KID between (N1, D) and (N2, D) features: (mean, std) of MMD^2 over `subsets` subsets.

    Each subset draws `subset_size` rows of each set without replacement (capped at the
    smaller set's size, as clean-fid does), first from features1 then from features2, with
    `np.random.RandomState(seed)`. Kernel: (gamma x.y + coef0)^degree, gamma 1/D by default.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k = [(a @ b.T * gamma + coef0) ** degree for a, b in ((x, x), (x, y), (y, y))]
        mmds[i] = _mmd2_unbiased(*k)
    return float(mmds.mean()), float(mmds.std())


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) Euclidean distances."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0))


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii.

    precision: fraction of generated samples inside some real sample's ball (radius: distance
    to its k-th nearest real neighbour); recall: the same with the roles swapped. O(N^2)
    memory: meant for the few thousand samples of an evaluation.
    """
    g, r = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    if min(len(g), len(r)) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    radius_g = np.sort(_pairwise(g, g), axis=1)[:, k]  # (Ng,) column 0 is the point itself
    radius_r = np.sort(_pairwise(r, r), axis=1)[:, k]  # (Nr,)
    d_gr = _pairwise(g, r)  # (Ng, Nr)
    precision = (d_gr <= radius_r[None, :]).any(axis=1).mean()
    recall = (d_gr.T <= radius_g[None, :]).any(axis=1).mean()
    return float(precision), float(recall)
