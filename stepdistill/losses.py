"""Distances shared by distillation losses: LPIPS from a local AlexNet backbone file.

LPIPS (Zhang et al. 2018) needs torchvision's AlexNet `features` weights, which are normally
downloaded. Here they come from `$STEPDISTILL_ASSETS/lpips-alexnet-features.safetensors` (or an
explicit path); LPIPS's own linear layers ship inside the lpips wheel. Images are in [-1, 1];
those smaller than 224 pixels are upsampled bilinearly to 224 and grey ones repeated to RGB, as the
consistency-models reference does for LPIPS at low resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import StepdistillError

ASSETS_ENV = "STEPDISTILL_ASSETS"
ALEXNET_FILE = "lpips-alexnet-features.safetensors"


def alexnet_features_path(path: str | Path | None = None) -> Path:
    """The AlexNet backbone file: `path`, else $STEPDISTILL_ASSETS/lpips-alexnet-features.safetensors."""
    if path is None:
        root = os.environ.get(ASSETS_ENV)
        if not root:
            raise StepdistillError(f"the LPIPS loss needs AlexNet weights: set {ASSETS_ENV} to a folder holding "
                                   f"{ALEXNET_FILE} (see ../shared/assets/README.md), or choose distill.loss=huber")
        path = Path(root) / ALEXNET_FILE
    path = Path(path)
    if not path.is_file():
        raise StepdistillError(f"LPIPS AlexNet weights not found at {path}; put {ALEXNET_FILE} there "
                               f"(or point {ASSETS_ENV} at the folder that holds it), or choose distill.loss=huber")
    return path


def lpips_network(path: str | Path | None = None) -> nn.Module:
    """lpips.LPIPS(net="alex") with its AlexNet slices loaded from the local safetensors file, frozen."""
    import warnings

    import lpips
    from safetensors.torch import load_file

    weights = load_file(str(alexnet_features_path(path)))
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    # LPIPS's slices hold torchvision's features[i] under the name str(i)
    for slice_ in (getattr(net.net, f"slice{k}") for k in range(1, net.net.N_slices + 1)):
        for name, layer in slice_.named_children():
            if f"{name}.weight" in weights:
                layer.weight.data.copy_(weights[f"{name}.weight"])
                layer.bias.data.copy_(weights[f"{name}.bias"])
    return net.eval().requires_grad_(False)


class LPIPSLoss(nn.Module):
    """mean LPIPS(x, y) for images in [-1, 1]; grey images go to RGB, small ones up to 224 pixels."""

    def __init__(self, path: str | Path | None = None, min_size: int = 224):
        super().__init__()
        self.net = lpips_network(path)
        self.min_size = min_size

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-1] < self.min_size:
            x = nn.functional.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(self._prep(x), self._prep(y)).mean()
