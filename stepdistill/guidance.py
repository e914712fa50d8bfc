"""Classifier-free guidance as an input: how a network receives the scale w, how w is drawn, its range check.

Scales are in diffusers' convention everywhere (uncond + w (cond - uncond); w = 1 is no guidance). A network
either takes no scale (classifier-free guidance mixes its conditional and null predictions: two passes) or
takes it as LCM's w-embedding (`timestep_cond`, diffusers' `time_cond_proj_dim`: one pass). Which one is
read once from the network's config, so losses never branch on it.
"""

from __future__ import annotations

import torch

from .conditioning import guidance_embedding
from .config import check_range
from .errors import ConfigError


def check_guidance_range(prefix: str, lo: float, hi: float) -> None:
    """`prefix.guidance_scale_min/max` must satisfy 0 <= min <= max."""
    check_range(f"{prefix}.guidance_scale_min", lo, 0)
    if hi < lo:
        raise ConfigError(f"{prefix}.guidance_scale_max = {hi} is below {prefix}.guidance_scale_min = {lo}")


def require_null_condition(denoiser, lo: float, hi: float, prefix: str = "distill") -> None:
    """Guidance scales other than 1 need a teacher with a null condition."""
    if (lo != 1.0 or hi != 1.0) and denoiser.null_cond is None:
        raise ConfigError(f"{prefix}.guidance_scale_min/max other than 1 need a conditional teacher with a null "
                          "condition (classifier-free guidance); set both to 1 for this teacher")


def draw_scales(lo: float, hi: float, n: int, device, generator=None) -> torch.Tensor | None:
    """w ~ U[lo, hi] per example; None when lo = hi = 1 (no guidance anywhere, one teacher pass)."""
    if lo == hi == 1.0:
        return None
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def with_guidance_input(cond: dict, w: torch.Tensor | None, dim: int, n: int, device) -> dict:
    """Condition dict plus the embedding of w - 1 as `timestep_cond` (LCM's convention; w=None: scale 1)."""
    w = torch.ones(n) if w is None else w
    return {**cond, "timestep_cond": guidance_embedding(w.detach().float().cpu() - 1.0, dim).to(device)}


class ClassifierFreeGuidance:
    """A network without a scale input: guidance mixes its conditional and null predictions (two passes)."""

    dim = None

    def predict(self, denoiser, x, t, cond, w):
        return denoiser.predict(x, t, cond, guidance=w)  # w=None: the conditional prediction alone

    def condition(self, cond: dict, w, n: int, device) -> dict:
        return cond


class EmbeddedGuidance:
    """A guidance-distilled network: w enters as the `timestep_cond` embedding (one pass)."""

    def __init__(self, dim: int):
        self.dim = dim

    def predict(self, denoiser, x, t, cond, w):
        return denoiser.predict(x, t, self.condition(cond, w, x.shape[0], x.device))

    def condition(self, cond: dict, w, n: int, device) -> dict:
        return with_guidance_input(cond, w, self.dim, n, device)


def embedded_guidance_dim(model) -> int | None:
    """The size of a network's guidance-scale input (time_cond_proj_dim), or None if it has none."""
    return getattr(model, "config", {}).get("time_cond_proj_dim")


def guidance_input(model) -> ClassifierFreeGuidance | EmbeddedGuidance:
    """How `model` is given the guidance scale."""
    dim = embedded_guidance_dim(model)
    return ClassifierFreeGuidance() if dim is None else EmbeddedGuidance(dim)
