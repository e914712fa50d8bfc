"""Distances shared by distillation losses, built by name, each returning one value per example.

- `l2`: mean squared difference;
- `huber`: LCM's elementwise pseudo-Huber mean(sqrt(d^2 + c^2) - c) (c = distill.huber_c, LCM: 0.001);
- `huber_ict`: iCT's pseudo-Huber on the whole example, sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(dim);
- `lpips`: LPIPS (AlexNet); latents are decoded to images first;
- `lpips_huber`: rectified flow++'s sum of the two, huber_ict plus LPIPS (a method may weight the Huber part
  per example, e.g. by 1 - t).

Methods reduce (and weight) the per-example values themselves.

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


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Per example mean(sqrt(d^2 + c^2) - c), written as d^2 / (sqrt(d^2 + c^2) + c) so small d keep precision."""
    d2 = (x.float() - y.float()) ** 2
    return (d2 / (torch.sqrt(d2 + c * c) + c)).flatten(1).mean(1)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example mean squared difference."""
    return ((x.float() - y.float()) ** 2).flatten(1).mean(1)


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(d) (Song & Dhariwal 2023; 0.03 for CIFAR-10's 3072)."""
    return 0.00054 * dim ** 0.5


def huber_ict(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per example sqrt(||x - y||^2 + c^2) - c, as n2 / (sqrt(n2 + c^2) + c)."""
    c = ict_huber_c(x[0].numel()) if c is None else c
    n2 = ((x.float() - y.float()) ** 2).flatten(1).sum(1)
    return n2 / (torch.sqrt(n2 + c * c) + c)


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

    def per_example(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(self._prep(x), self._prep(y)).reshape(-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_example(x, y).mean()


class Distance(nn.Module):
    """A distance by name (see the module docstring): `distance(x, y)` gives one value per example.

    `decode` maps the network's space to images for the LPIPS-based ones (a latent codec's differentiable
    decode; None for pixel models)."""

    NAMES = ("l2", "huber", "huber_ict", "lpips", "lpips_huber")

    def __init__(self, name: str, huber_c: float = 0.001, ict_c: float | None = None, decode=None,
                 lpips_path: str | Path | None = None):
        super().__init__()
        if name not in self.NAMES:
            raise StepdistillError(f"unknown distance {name!r}; choose one of {', '.join(self.NAMES)}")
        self.name, self.huber_c, self.ict_c, self.decode = name, huber_c, ict_c, decode
        self.lpips = LPIPSLoss(lpips_path) if name in ("lpips", "lpips_huber") else None

    def _lpips(self, x, y):
        if self.decode is not None:
            x, y = self.decode(x), self.decode(y)
        return self.lpips.per_example(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor, huber_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "l2":
            return l2(x, y)
        if self.name == "huber":
            return pseudo_huber(x, y, self.huber_c)
        if self.name == "lpips":
            return self._lpips(x, y)
        h = huber_ict(x, y, self.ict_c)
        if self.name == "huber_ict":
            return h
        return (h if huber_weight is None else huber_weight.reshape(-1) * h) + self._lpips(x, y)
