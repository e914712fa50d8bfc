"""Quality of samplers on the digits world: generate, embed with the digits classifier, Frechet distance.

This is the measurement behind the quickstart's table: every row (teacher DDIM at k steps,
student at k steps) draws the same class labels and the same initial noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import linalg

from ..training.data import DIGITS_CLASSES, digits_images
from .features import load_digits_classifier


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017)."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class DigitsFID:
    """FID in the digits classifier's feature space against all 1,797 real digits."""

    def __init__(self, classifier_path=None, device="cpu"):
        self.device = device
        self.classifier = load_digits_classifier(classifier_path, device)
        real, _ = digits_images()
        self.ref = feature_statistics(self.features(real))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 500) -> np.ndarray:
        out = [self.classifier.features(images[i:i + batch].to(self.device).clamp(-1, 1)).cpu()
               for i in range(0, len(images), batch)]
        return torch.cat(out).numpy()

    def __call__(self, images: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(self.features(images)), *self.ref)


@torch.no_grad()
def generate(sample_fn: Callable, num: int, shape, encode: Callable, device="cpu", batch: int = 250,
             seed: int = 0) -> torch.Tensor:
    """Images from `sample_fn(noise, cond, generator)`, balanced over the ten classes, same noise every call."""
    g = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        noise = torch.randn((n, *shape), generator=g).to(device)
        labels = torch.arange(start, start + n) % DIGITS_CLASSES
        cond = encode({"class_labels": labels})
        out.append(sample_fn(noise, cond, gen).cpu())
    return torch.cat(out)
