"""Teacher ODE steps between arbitrary times (samplers over a time grid are in stepdistill.samplers).

All steps work in DDIM's coordinates y = x / alpha, lambda = sigma / alpha, where the
probability-flow ODE reads dy/dlambda = eps. In those coordinates DDIM is Euler's method
(for a flow schedule it is exactly flow-matching Euler), and Heun is EDM's second-order step.
"""

from __future__ import annotations

from typing import Callable

import torch

from .denoiser import Denoiser
from .schedules import _bcast


def _t(t, x):
    return torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])


def ddim_step(denoiser: Denoiser, x, t, t_next, cond=None, guidance=None, clip_x0: float | None = None, pred=None):
    """One deterministic DDIM step x_t -> x_{t_next} (Song et al. 2021, eta = 0)."""
    t, t_next = _t(t, x), _t(t_next, x)
    x0, eps = pred if pred is not None else denoiser.predict(x, t, cond, guidance)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    a, s = denoiser.alpha_sigma(t_next, x)
    return a * x0 + s * eps


def euler_step(denoiser: Denoiser, x, t, t_next, cond=None, guidance=None, clip_x0=None, pred=None):
    """Euler on the probability-flow ODE; identical to DDIM in (y, lambda) and to flow-matching Euler."""
    return ddim_step(denoiser, x, t, t_next, cond, guidance, clip_x0, pred)


def heun_step(denoiser: Denoiser, x, t, t_next, cond=None, guidance=None, clip_x0=None, pred=None):
    """Heun's second-order step in (y, lambda) (Karras et al. 2022, Algorithm 1).

    Decided per example, as EDM decides per step: an example whose t_next is the clean end (sigma = 0,
    where lambda = 0 and the second slope is undefined) takes the Euler step, the rest of the batch Heun."""
    t, t_next = _t(t, x), _t(t_next, x)
    a, s = denoiser.alpha_sigma(t, x)
    a2, s2 = denoiser.alpha_sigma(t_next, x)
    p1 = pred if pred is not None else denoiser.predict(x, t, cond, guidance)
    x_euler = ddim_step(denoiser, x, t, t_next, clip_x0=clip_x0, pred=p1)
    lands_clean = s2 == 0
    if bool(lands_clean.all()):
        return x_euler
    p2 = denoiser.predict(x_euler, t_next, cond, guidance)
    eps = 0.5 * (p1.eps + p2.eps)
    y_next = x / a + (s2 / a2 - s / a) * eps
    return torch.where(lands_clean, x_euler, a2 * y_next)


STEPS: dict[str, Callable] = {"ddim": ddim_step, "euler": euler_step, "heun": heun_step}


def nfe(solver: str, steps: int) -> int:
    """Network evaluations per sample over a grid ending at the clean end (before guidance doubling): Heun's
    last step is Euler."""
    return 2 * steps - 1 if solver == "heun" else steps
