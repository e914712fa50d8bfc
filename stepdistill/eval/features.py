"""Feature extractors for FID. The digits classifier stands in for Inception on the digits world."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import StepdistillError
from ..paths import DIGITS_CLASSIFIER


class DigitsClassifier(nn.Module):
    """A small CNN on 1x16x16 digits in [-1, 1]; its penultimate layer is the FID feature space."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = {"feature_dim": feature_dim, "num_classes": num_classes, "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),   # 8x8
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),  # 4x4
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config, indent=1))


def load_digits_classifier(path: str | Path | None = None, device="cpu") -> DigitsClassifier:
    path = Path(path) if path is not None else DIGITS_CLASSIFIER
    if not (path / "model.safetensors").is_file():
        raise StepdistillError(f"digits classifier not found at {path}; run `python scripts/train_classifier.py`")
    model = DigitsClassifier(**json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device).eval().requires_grad_(False)
