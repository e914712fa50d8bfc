"""Conditions -> model keyword arguments, null conditions for guidance, and image <-> model space.

A Conditioner turns a data batch (class labels, prompts) into the keyword arguments the
network takes, and knows the "no condition" used by classifier-free guidance. A Codec moves
images in [-1, 1] to the space the network denoises (pixels, or scaled VAE latents).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 w (sin half, then cos half), as LCM's w-conditioning (timestep_cond).

    Here w is the guidance scale in diffusers' convention minus one, as LatentConsistencyModelPipeline feeds it.
    """
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class Conditioner:
    """Unconditional models: no keyword arguments, no guidance."""

    kind = "unconditional"

    def encode(self, batch: dict, device) -> dict:
        return {}

    def null(self) -> dict | None:
        return None

    def example_conditions(self, n: int) -> dict:
        """Raw conditions for sample grids (what a data batch would hold)."""
        return {}

    def prepare(self, data_config) -> None:
        """Take the run's data settings (e.g. text-embedding caching); nothing to do for most conditioners."""


class ClassConditioner(Conditioner):
    """Class labels passed as `class_labels`, with one label index reserved for 'no class'."""

    kind = "class"

    def __init__(self, num_classes: int, null_class: int | None):
        self.num_classes = num_classes
        self.null_class = null_class

    def encode(self, batch, device):
        return {"class_labels": torch.as_tensor(batch["class_labels"], device=device).long()}

    def null(self):
        if self.null_class is None:
            return None
        return {"class_labels": torch.tensor([self.null_class])}

    def example_conditions(self, n):
        return {"class_labels": torch.arange(n) % self.num_classes}


class PixelCodec(nn.Module):
    """Pixel-space models denoise the image itself."""

    latent = False

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def differentiable_decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LatentCodec(nn.Module):
    """A VAE with the pipeline's scaling (and SD3/Flux shift) factor."""

    latent = True

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.get("scaling_factor", 1.0) or 1.0
        self.shift = vae.config.get("shift_factor", 0.0) or 0.0

    @torch.no_grad()
    def encode(self, images):
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return ((dist.sample() - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, x):
        return self.differentiable_decode(x)

    def differentiable_decode(self, x):
        """Latents -> images with gradients flowing to x (the VAE itself stays frozen), for image-space losses."""
        return self.vae.decode((x / self.scale + self.shift).to(self.vae.dtype)).sample.float()


def drop_conditions(cond: dict, null: dict | None, p: float, generator=None) -> dict:
    """Replace each example's condition by the null condition with probability p (trains CFG)."""
    if null is None or p <= 0 or not cond:
        return cond
    n = next(v for v in cond.values() if isinstance(v, torch.Tensor)).shape[0]
    device = next(v for v in cond.values() if isinstance(v, torch.Tensor)).device
    drop = torch.rand(n, device=device, generator=generator) < p
    out = dict(cond)
    for k, v in null.items():
        v = v.to(device)
        mask = drop.reshape((n,) + (1,) * (cond[k].ndim - 1))
        out[k] = torch.where(mask, v.expand_as(cond[k]), cond[k])
    return out
