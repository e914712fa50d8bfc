"""Quality of samplers on the digits world: generate, embed with the digits classifier, FID (torch-fidelity).

This is the measurement behind the quickstart's table: every row (teacher DDIM at k steps,
student at k steps) draws the same class labels and the same initial noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..training.data import DIGITS_CLASSES
from .features import DIGITS_EXTRACTOR
from .fid import Statistics, cached_statistics, create_extractor, extract, frechet_distance
from .sources import TensorSource, digits_source, to_uint8_nchw


class DigitsFID:
    """FID in the digits classifier's feature space against all 1,797 real digits.

    The same path as real data: images are rounded to uint8 (as PNG files hold them), embedded by the
    classifier registered with torch-fidelity, and compared by torch-fidelity; the reference statistics
    are cached (see fid.cache_dir).
    """

    def __init__(self, classifier_path=None, device="cpu"):
        from ..paths import DIGITS_CLASSIFIER

        self.extractor = create_extractor(DIGITS_EXTRACTOR, classifier_path or DIGITS_CLASSIFIER, device)
        self.ref = cached_statistics(digits_source(), self.extractor, batch_size=500, progress=False)

    def features(self, images: torch.Tensor, batch: int = 500) -> np.ndarray:
        source = TensorSource(to_uint8_nchw(images), "samples")
        return extract(source, self.extractor, batch, progress=False)["features"].numpy()

    def __call__(self, images: torch.Tensor) -> float:
        stats = Statistics.from_features(torch.from_numpy(self.features(images)), self.extractor.key, "samples")
        return frechet_distance(stats, self.ref)


@torch.no_grad()
def generate(sample_fn: Callable, num: int, shape, device="cpu", batch: int = 250, seed: int = 0) -> torch.Tensor:
    """Images from `sample_fn(noise, labels, generator)`, balanced over the ten classes, same noise every call.

    `labels` are the raw class labels (as a data batch holds them); the images are in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        noise = torch.randn((n, *shape), generator=g).to(device)
        labels = torch.arange(start, start + n) % DIGITS_CLASSES
        out.append(sample_fn(noise, labels, gen).cpu())
    return torch.cat(out)
