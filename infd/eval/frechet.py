"""Frechet distance between two Gaussians fitted to feature sets (FID when the features are
the standard Inception pool3 features).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))

Everything runs in float64 with numpy/scipy. Two routes for the trace term:
- "eigh" (default): Tr((s1 s2)^(1/2)) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2))). The eigenvalues of
  s1 s2 equal those of the symmetric PSD s1^(1/2) s2 s1^(1/2), so two symmetric
  eigendecompositions replace a general matrix square root: no complex numbers, and about 4x
  faster than scipy's sqrtm at D = 2048 (3.7 s against 16 s on one CPU thread). Tiny negative
  eigenvalues from rounding are clipped to 0 (the counterpart of dropping tiny imaginary parts).
- "sqrtm": the reference FID code (TTUR, pytorch-fid, clean-fid) verbatim in behaviour:
  scipy.linalg.sqrtm of s1 s2; a non-finite result retries with eps on the diagonals; a complex
  result must have a diagonal imaginary part below 1e-3 and is then taken as real.
tests/test_gen_metrics.py checks both against closed forms, torchmetrics, torch-fidelity and clean-fid.
"""
from __future__ import annotations

import warnings

import numpy as np

SQRTM_EPS = 1e-6  # pytorch-fid / clean-fid's diagonal offset for a singular product
IMAG_ATOL = 1e-3  # pytorch-fid / clean-fid's tolerance on the diagonal's imaginary part


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) (numpy or torch) -> (mu (D,), sigma (D, D)) in float64.

    sigma is the unbiased covariance (divides by N - 1), as np.cov in the standard FID code.
    """
    feats = _as_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh") -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D) -> float.

    method: "eigh" (default) or "sqrtm" (see the module docstring). Inputs are cast to float64.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():  # NaN features (a diverged model) must not read as a number
            raise ValueError(f"{name} has non-finite values")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on an accelerator
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (D, D); rounding-negative eigenvalues -> 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) through s1^(1/2) s2 s1^(1/2), which is symmetric PSD."""
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrtm(sigma1 sigma2)) as pytorch-fid / clean-fid compute it."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # the product is (nearly) singular
        warnings.warn(f"Frechet distance: singular product; adding {SQRTM_EPS} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding gives a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


class FeatureMoments:
    """Running sums of features (N, D) for their mean and covariance, in float64, so that ranks
    can add theirs with one all-reduce: memory is O(D^2) whatever N (2048 features: 32 MB).

    The covariance from sums, (S2 - N mu mu^T) / (N - 1), equals np.cov of the stacked features
    up to float64 rounding (features of order 1: relative 1e-12 at N = 50k).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features) -> None:
        """features (B, D), numpy or torch."""
        feats = _as_float64(features)
        self.count += feats.shape[0]
        self.sum += feats.sum(axis=0)
        self.outer += feats.T @ feats

    def all_reduce(self, device=None) -> "FeatureMoments":
        """Sum over the ranks of the default process group (a no-op without one); in place."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        flat = torch.from_numpy(np.concatenate([[float(self.count)], self.sum, self.outer.ravel()])).to(device)
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        dim = self.sum.shape[0]
        self.count, self.sum, self.outer = int(round(flat[0])), flat[1:dim + 1], flat[dim + 1:].reshape(dim, dim)
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), sigma unbiased as feature_stats'."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2
