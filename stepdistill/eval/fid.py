"""FID, KID and precision/recall through torch-fidelity, with reference statistics cached across runs.

torch-fidelity builds the extractor (from its registry, where ours are registered too) and computes every
metric from features; this module only supplies the features: from any ImageSource, batched, on any device,
split across processes under `accelerate launch` or torchrun, and cached as safetensors keyed by a content
hash of the images, the extractor and its weights.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from ..files import atomic_save_file, readable_safetensors
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL, \
    prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

from ..errors import StepdistillError
from .features import register_extractors
from .sources import ImageSource

STATS_FORMAT = "stepdistill-fid-stats/1"
METRICS = ("fid", "kid", "prc")


def cache_dir() -> Path:
    """$STEPDISTILL_CACHE, else ~/.cache/stepdistill."""
    return Path(os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill").expanduser()


_HASHES: dict[tuple, str] = {}


def weights_sha256(path: str | Path | None) -> str:
    """Content hash of a weights file or folder (its *.safetensors / *.pt files), memoised per file state."""
    if path is None:
        return "default"
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".pt", ".json")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 22), b""):
                    fh.update(chunk)
            _HASHES[key] = fh.hexdigest()
        h.update(f.name.encode() + _HASHES[key].encode())
    return h.hexdigest()


@dataclass
class Extractor:
    """A torch-fidelity feature extractor, the one layer we read from it, and the identity of its weights."""

    name: str
    layer: str
    module: torch.nn.Module
    key: str  # name, layer and weights hash: what statistics depend on
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module.convert_features_tuple_to_dict(self.module(images.to(self.device)))
        return out[self.layer].float().cpu()


def create_extractor(name: str, weights: str | Path | None = None, device=None, layer: str | None = None) -> Extractor:
    """Build extractor `name` from torch-fidelity's registry, as `calculate_metrics` would, on `device`."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    register_extractors()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise StepdistillError(f"unknown feature extractor {name!r}; choose from auto, inception, digits, "
                               f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    try:
        module = create_feature_extractor(name, [layer], cuda=False, verbose=False,
                                          feature_extractor_weights_path=None if weights is None else str(weights))
    except (OSError, RuntimeError) as e:  # a download that failed, a file that is not what it says
        from .features import INCEPTION_COMPAT, inception_error

        if name == INCEPTION_COMPAT:
            raise inception_error(f"torch-fidelity's download failed ({e})") from None
        raise StepdistillError(f"could not build feature extractor {name!r}: {e}") from None
    device = torch.device(device or default_device())
    module.to(device)
    return Extractor(name, layer, module, f"{name}:{layer}:{weights_sha256(weights)}", device)


# ----------------------------------------------------------------------------- processes


def world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when a group is up, else from accelerate's launch environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes
    return 0, 1


def default_device() -> torch.device:
    if world()[1] > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract_parts(source: ImageSource, extractor: Extractor | None, batch_size: int, scorers: dict | None,
                  rank: int, size: int, progress: bool = True, desc: str | None = None) -> dict[int, dict]:
    """This process's share: batch j -> {"features": ..., <scorer>: ...} for every j with j % size == rank."""
    if batch_size < 1:
        raise StepdistillError(f"--batch-size must be at least 1, got {batch_size}")
    parts = {}
    bar = tqdm(total=len(source), desc=desc or source.label, unit="img", leave=False, dynamic_ncols=True,
               disable=not progress or rank != 0)
    for j in range(rank, -(-len(source) // batch_size), size):
        images = source.batch(j, batch_size)
        out = {}
        if extractor is not None:
            out["features"] = extractor(images)
        for name, fn in (scorers or {}).items():
            out[name] = fn(images, j * batch_size).float().cpu()
        parts[j] = out
        bar.update(min(len(images) * size, bar.total - bar.n))
    bar.close()
    return parts


def concat_parts(parts: dict[int, dict]) -> dict[str, torch.Tensor]:
    keys = next(iter(parts.values())).keys() if parts else ()
    return {k: torch.cat([parts[j][k] for j in sorted(parts)]) for k in keys}


def extract(source: ImageSource, extractor: Extractor | None, batch_size: int = 64,
            scorers: dict[str, Callable] | None = None, desc: str | None = None,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Features of every image of `source` (key "features"), plus per-image scores from `scorers`
    (name -> fn(images, start) -> (N,) tensor), in source order on every process. Batch j runs on
    process j % world size; the results are gathered."""
    rank, size = world()
    parts = extract_parts(source, extractor, batch_size, scorers, rank, size, progress, desc)
    if size > 1:
        gathered = [None] * size
        torch.distributed.all_gather_object(gathered, parts)
        parts = {j: v for p in gathered for j, v in p.items()}
    return concat_parts(parts)


# ----------------------------------------------------------------------------- statistics


@dataclass
class Statistics:
    """Mean and covariance of a set's features (what FID needs), with the features themselves for KID and
    precision/recall, and which extractor made them."""

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None
    extractor: str  # Extractor.key
    source: str

    @classmethod
    def from_features(cls, features: torch.Tensor, extractor: str, source: str) -> "Statistics":
        if len(features) < 2:
            raise StepdistillError(f"{source}: FID needs at least 2 images, got {len(features)}")
        stats = fid_features_to_statistics(features.float().cpu())
        return cls(stats["mu"], stats["sigma"], features, extractor, source)

    @property
    def num(self) -> int:
        return len(self.features) if self.features is not None else -1

    def save(self, path: str | Path) -> Path:
        """safetensors, written to a temporary name and renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mu": torch.from_numpy(np.ascontiguousarray(self.mu)),
                   "sigma": torch.from_numpy(np.ascontiguousarray(self.sigma))}
        if self.features is not None:
            tensors["features"] = self.features.contiguous()
        return atomic_save_file(tensors, path, metadata={"format": STATS_FORMAT, "extractor": self.extractor,
                                                         "source": self.source, "num_samples": str(self.num)})

    @classmethod
    def load(cls, path: str | Path, features: bool = True) -> "Statistics":
        path = Path(path)
        if not path.is_file():
            raise StepdistillError(f"statistics file {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATS_FORMAT:
                    raise StepdistillError(f"{path} is not a stepdistill statistics file (no format {STATS_FORMAT!r} "
                                           "in its metadata); write one with `stepdistill fid INPUT --save-stats PATH`")
                keys = set(f.keys())
                mu, sigma = f.get_tensor("mu").numpy(), f.get_tensor("sigma").numpy()
                feats = f.get_tensor("features") if features and "features" in keys else None
        except StepdistillError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise StepdistillError(f"cannot read statistics file {path}: {e}") from None
        return cls(mu, sigma, feats, meta.get("extractor", "?"), meta.get("source", str(path)))


def stats_extractor_name(path: str | Path) -> str:
    """The torch-fidelity extractor name a statistics file was made with."""
    return Statistics.load(path, features=False).extractor.split(":")[0]


def cached_statistics(source: ImageSource, extractor: Extractor, batch_size: int = 64, cache: bool = True,
                      progress: bool = True) -> Statistics:
    """Statistics of a fixed image set, computed once per (images, resolution, extractor, weights) and then read
    from the cache; generated sources (no content key) are always computed."""
    key = source.content_key() if cache else None
    path = None
    if key is not None:
        digest = hashlib.sha256(f"{key}|{extractor.key}".encode()).hexdigest()[:20]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.label)[:40]
        path = cache_dir() / "fid-stats" / f"{safe}-{extractor.name}-{digest}.safetensors"
        if readable_safetensors(path) is not None:  # a torn cache file (a copy cut short) is computed again
            return Statistics.load(path)
    feats = extract(source, extractor, batch_size, progress=progress)["features"]
    stats = Statistics.from_features(feats, extractor.key, source.label)
    if path is not None and world()[0] == 0:
        stats.save(path)
    return stats


# ----------------------------------------------------------------------------- metrics


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID between two feature Gaussians, by torch-fidelity."""
    mu_t = np.result_type(a.mu, b.mu)
    sigma_t = np.result_type(a.sigma, b.sigma)
    sa = {"mu": a.mu.astype(mu_t, copy=False), "sigma": a.sigma.astype(sigma_t, copy=False)}
    sb = {"mu": b.mu.astype(mu_t, copy=False), "sigma": b.sigma.astype(sigma_t, copy=False)}
    return float(fid_statistics_to_metric(sa, sb, False)[KEY_METRIC_FID])


def check_compatible(a: Statistics, b: Statistics) -> None:
    if a.extractor != b.extractor or a.mu.shape != b.mu.shape:
        raise StepdistillError(
            f"mismatched statistics: {a.source} was embedded with {a.extractor} ({a.mu.shape[0]}-d), {b.source} with "
            f"{b.extractor} ({b.mu.shape[0]}-d); compute both with the same extractor and weights")


def compute_metrics(a: Statistics, b: Statistics, metrics=("fid",), kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 2020) -> dict[str, float]:
    """FID / KID / precision-recall of `a` (samples) against `b` (reference), all by torch-fidelity's functions.
    KID subsets shrink to the smaller set when it holds fewer than `kid_subset_size` samples."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise StepdistillError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}, clip")
    check_compatible(a, b)
    out: dict[str, float] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(a, b)
    if "kid" in metrics or "prc" in metrics:
        for s in (a, b):
            if s.features is None:
                raise StepdistillError(f"{s.source} holds statistics only; KID and precision/recall need features "
                                       "(pass the images, or a statistics file written by this version)")
    if "kid" in metrics:
        size = min(kid_subset_size, len(a.features), len(b.features))
        if size < 2:
            raise StepdistillError("KID needs at least 2 samples on each side")
        kid = kid_features_to_metric(a.features, b.features, kid_subsets=kid_subsets, kid_subset_size=size,
                                     rng_seed=seed, verbose=False)
        out["kid_mean"], out["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
    if "prc" in metrics:
        if min(len(a.features), len(b.features)) < 4:
            raise StepdistillError("precision/recall needs at least 4 samples on each side (3 nearest neighbours)")
        prc = prc_features_to_metric(a.features, b.features, prc_neighborhood=3, prc_batch_size=10000,
                                     save_cpu_ram=False, verbose=False)
        out["precision"], out["recall"] = prc[KEY_METRIC_PRECISION], prc[KEY_METRIC_RECALL]
        out["f_score"] = prc[KEY_METRIC_F_SCORE]
    return out
