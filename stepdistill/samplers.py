"""Samplers over a descending time grid, with one signature (in the manner of k-diffusion's sampling.py):

    sample_x(model, x, times, extra_args=None, callback=None, generator=None, **options) -> sample

`model` is a Denoiser (or anything with its `predict`, `alpha_sigma` and `add_noise`), `x` the starting
noise at times[0] (treated as pure noise, as diffusers' init_noise_sigma = 1), `extra_args` keyword
arguments of `model.predict` (cond, guidance), `generator` the source of any fresh noise, and
`callback` receives {"i", "t", "x", "denoised"} after each step.
"""

from __future__ import annotations

import torch

from .solvers import STEPS


def _report(callback, i, t, x, denoised):
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": denoised})


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ode(model, x, times, extra_args=None, callback=None, generator=None, solver: str = "ddim",
               clip_x0: float | None = None):
    """The probability-flow ODE from times[0] to times[-1] with DDIM / Euler / Heun steps (deterministic)."""
    step = STEPS[solver]
    times = torch.as_tensor(times)
    extra = extra_args or {}
    for i in range(len(times) - 1):
        x = step(model, x, times[i], times[i + 1], extra.get("cond"), extra.get("guidance"), clip_x0)
        _report(callback, i, times[i], x, None)
    return x


@torch.no_grad()
def sample_consistency(model, x, times, extra_args=None, callback=None, generator=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(x, t), re-noise to the next t."""
    times = torch.as_tensor(times, device=x.device)
    extra = extra_args or {}
    n = x.shape[0]
    for i, t in enumerate(times):
        x0 = model.predict(x, t.expand(n), **extra).x0
        _report(callback, i, t, x, x0)
        if i + 1 < len(times):
            x = model.add_noise(x0, _noise_like(x, generator), times[i + 1].expand(n))
    return x0


@torch.no_grad()
def sample_tcd(model, x, times, extra_args=None, callback=None, generator=None, landing=None, gamma: float = 0.3):
    """Strategic stochastic sampling (TCD, Zheng et al. 2024, Algorithm 4; diffusers' TCDScheduler.step).

    times: t_0 > ... > t_K (the last is where the final step lands); landing[i]: the time s the model's
    DDIM jump from t_i reaches, from which the sample is re-noised to t_{i+1} (s = t_{i+1} when gamma = 0)."""
    times = torch.as_tensor(times, device=x.device)
    extra = extra_args or {}
    n, steps = x.shape[0], len(times) - 1
    for i in range(steps):
        t, t_next = times[i].expand(n), times[i + 1].expand(n)
        s = torch.as_tensor(landing[i], device=x.device).float().expand(n)
        pred = model.predict(x, t, **extra)
        a_s, sig_s = model.alpha_sigma(s, x)
        x_s = a_s * pred.x0 + sig_s * pred.eps
        _report(callback, i, times[i], x, pred.x0)
        if gamma > 0 and i + 1 < steps:
            a_n, sig_n = model.alpha_sigma(t_next, x)
            ratio = a_n / a_s
            x = ratio * x_s + (sig_n ** 2 - (ratio * sig_s) ** 2).clamp(min=0).sqrt() * _noise_like(x, generator)
        else:
            x = x_s
    return x

