"""The Fréchet distance between two sets of features, each summarised by a Gaussian (the FID's formula):

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

The feature extractor is the caller's and must be stated next to the number: clipforge reports it with the
image tower of a clipforge CLIP run (Inception weights are not downloaded). Computed in float64. Only the trace
of the matrix square root is needed: it is the sum of the square roots of the eigenvalues of S_a S_b (real and
non-negative for covariances; an imaginary part or a negative eigenvalue from round-off is dropped), as
torchmetrics computes it. scipy's sqrtm is not used: its return type changed (scipy 1.17 returns a bare array
for 1x1 matrices and deprecates `disp`).
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mean [D], covariance [D, D]) in float64 (unbiased covariance, N >= 2)."""
    array = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else \
        np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs [N >= 2, D] features, got shape {tuple(array.shape)}")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance_from_statistics(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                     sigma_b: np.ndarray) -> float:
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"Fréchet distance of features of different sizes: {mu_a.shape} vs {mu_b.shape}")
    eigenvalues = np.linalg.eigvals(sigma_a @ sigma_b).astype(np.complex128)
    trace_root = float(np.sqrt(eigenvalues).real.sum())  # Tr((S_a S_b)^(1/2))
    difference = mu_a - mu_b
    return float(difference @ difference + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)


def frechet_distance(features_a, features_b) -> float:
    """The Fréchet distance between [N, D] and [M, D] feature sets (>= 0 up to round-off)."""
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))
