"""Feature extractors for FID, all registered with torch-fidelity.

The digits classifier stands in for Inception on the digits world; the FID Inception network comes
from a local TorchScript or safetensors file, or from torch-fidelity's usual download.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ..errors import StepdistillError
from ..paths import DIGITS_CLASSIFIER
from ..training.data import DIGITS_SIZE


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


# ----------------------------------------------------------------------------- torch-fidelity extractors
#
# Every extractor below is registered with torch-fidelity, so `torch_fidelity.calculate_metrics(...,
# feature_extractor=NAME)` and `stepdistill fid` build it the same way. torch-fidelity's convention holds
# for all of them: input is uint8 N x 3 x H x W (RGB), each extractor resizes for itself.

DIGITS_EXTRACTOR = "stepdistill-digits"
INCEPTION_TORCHSCRIPT = "inception-fid-torchscript"
INCEPTION_SAFETENSORS = "inception-v3-compat-safetensors"
INCEPTION_COMPAT = "inception-v3-compat"  # torch-fidelity's own, downloaded by torch-fidelity
INCEPTION_FILE = "inception-2015-12-05-fid.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _check_uint8(x: torch.Tensor) -> None:
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)):
        raise ValueError(f"feature extractors take uint8 N x 3 x H x W images, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")


class DigitsExtractor(FeatureExtractorBase):
    """The digits classifier as a torch-fidelity extractor, so the digits world takes the real-data code path.

    RGB (or gray) uint8 of any size -> gray, resized to 16x16 if needed, scaled to [-1, 1], as in training.
    `feature_extractor_weights_path` is a classifier folder (default: samples/digits-classifier).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digits_classifier(feature_extractor_weights_path)

    def forward(self, x):
        _check_uint8(x)
        x = x.float().mean(1, keepdim=True)
        if x.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
            x = nn.functional.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", antialias=True,
                                          align_corners=False).clamp(0, 255)
        feats = self.classifier.features(x / 127.5 - 1.0)
        out = {"features": feats, "logits": self.classifier.head(feats)}
        return tuple(out[f] for f in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


def inception_error(detail: str = "") -> StepdistillError:
    return StepdistillError(
        f"FID with Inception needs the Inception weights, and none were found{': ' + detail if detail else ''}. "
        f"Either put {INCEPTION_FILE} (the FID Inception network as TorchScript, sha256 {INCEPTION_SHA256[:12]}...) "
        "in a folder and set STEPDISTILL_ASSETS to that folder, or pass --inception-weights PATH (that .pt file, or "
        "torch-fidelity's weights converted to .safetensors), or run online so torch-fidelity downloads "
        f"{URL_INCEPTION_V3} into {Path(torch.hub.get_dir()) / 'checkpoints'}.")


class InceptionTorchScript(FeatureExtractorBase):
    """The FID Inception network from a TorchScript file (the offline asset), fed as torch-fidelity feeds its own:
    TensorFlow-1-style bilinear resize to 299, then uint8 / 128 - 1."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or assets_inception_path()
        if path is None or not Path(path).is_file():
            raise inception_error(f"{path} does not exist" if path else "")
        self.net = torch.jit.load(str(path), map_location="cpu")

    def forward(self, x):
        _check_uint8(x)
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        return (self.net((x - 128) / 128),)

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise StepdistillError(f"{INCEPTION_TORCHSCRIPT} has no logits head, so no Inception Score")
        return "2048"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)


@contextmanager
def _inception_state_from(state_dict):
    """torch-fidelity's Inception unpickles a local weights file; hand it a safetensors state dict instead."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


class InceptionV3Safetensors(FeatureExtractorInceptionV3):
    """torch-fidelity's `inception-v3-compat`, bit for bit, with its weights read from a .safetensors file."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None or not Path(feature_extractor_weights_path).is_file():
            raise inception_error(f"{feature_extractor_weights_path} does not exist"
                                  if feature_extractor_weights_path else "")
        with _inception_state_from(load_file(str(feature_extractor_weights_path))):
            super().__init__(name, features_list, feature_extractor_weights_path=None, **kwargs)


def assets_inception_path() -> Path | None:
    """$STEPDISTILL_ASSETS/inception-2015-12-05-fid.pt, when that setting names a folder."""
    folder = os.environ.get("STEPDISTILL_ASSETS")
    return Path(folder).expanduser() / INCEPTION_FILE if folder else None


def offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("STEPDISTILL_OFFLINE", "HF_HUB_OFFLINE"))
    return any(v not in ("", "0", "false", "False") for v in flags)


def resolve_inception(weights: str | Path | None = None) -> tuple[str, str | None]:
    """(extractor name, weights path) for FID Inception: the given file, then $STEPDISTILL_ASSETS, then
    torch-fidelity's cached or downloaded weights (announced, and never when offline)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise inception_error(f"--inception-weights {weights} does not exist")
        if path.suffix == ".safetensors":
            return INCEPTION_SAFETENSORS, str(path)
        if path.suffix == ".pt":  # TorchScript: the documented exception to safetensors-only
            return INCEPTION_TORCHSCRIPT, str(path)
        raise StepdistillError(
            f"--inception-weights {weights}: stepdistill loads a TorchScript .pt ({INCEPTION_FILE}) or a .safetensors "
            "state dict, never pickles. Convert torch-fidelity's .pth once with `python -c \"import torch, "
            "safetensors.torch as s; s.save_file(torch.load('IN.pth', weights_only=True), 'OUT.safetensors')\"`.")
    assets = assets_inception_path()
    if assets is not None:
        if not assets.is_file():
            raise inception_error(f"STEPDISTILL_ASSETS is set, but {assets} does not exist")
        return INCEPTION_TORCHSCRIPT, str(assets)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if cached.is_file():
        return INCEPTION_COMPAT, None
    if offline():
        raise inception_error("offline (HF_HUB_OFFLINE / STEPDISTILL_OFFLINE), so nothing is downloaded")
    print(f"downloading torch-fidelity's Inception weights from {URL_INCEPTION_V3} to {cached.parent}",
          file=sys.stderr)
    return INCEPTION_COMPAT, None


def register_extractors() -> None:
    """Make our extractors known to torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    for name, cls in ((DIGITS_EXTRACTOR, DigitsExtractor), (INCEPTION_TORCHSCRIPT, InceptionTorchScript),
                      (INCEPTION_SAFETENSORS, InceptionV3Safetensors)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


register_extractors()
