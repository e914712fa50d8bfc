"""One Denoiser over any diffusers model and its noise schedule.

The network's raw output is turned into (x0, eps) by one hook per parameterization
(epsilon, v, sample, flow velocity), so losses and solvers never branch on the teacher's
prediction type. Classifier-free guidance batches the conditional and null conditions in
one call and mixes the predictions as uncond + w (cond - uncond) (diffusers' convention:
w = 1 is no guidance).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

from .errors import StepdistillError
from .schedules import FlowSchedule, NoiseSchedule, VPSchedule, _bcast, schedule_from_scheduler_config


class Prediction(NamedTuple):
    x0: torch.Tensor
    eps: torch.Tensor


def _first_forward_arg(model: nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else ""


def cat_cond(a, b):
    """Concatenate two condition dicts (possibly nested, as SDXL's added_cond_kwargs) along the batch."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if a is None:
        return None
    return torch.cat([a, b])


def repeat_cond(cond, n: int, device=None):
    """Expand batch-1 condition tensors to batch n on `device` (null conditions are stored once)."""
    if isinstance(cond, dict):
        return {k: repeat_cond(v, n, device) for k, v in cond.items()}
    if cond is None:
        return None
    cond = cond.to(device) if device is not None else cond
    return cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond


def cond_batch_size(cond) -> int | None:
    for v in (cond or {}).values():
        if isinstance(v, dict):
            n = cond_batch_size(v)
            if n is not None:
                return n
        elif isinstance(v, torch.Tensor):
            return v.shape[0]
    return None


def _cast_floats(cond, dtype):
    """Floating tensors of a (possibly nested, as SDXL's added_cond_kwargs) condition dict in the model's dtype."""
    if isinstance(cond, dict):
        return {k: _cast_floats(v, dtype) for k, v in cond.items()}
    return cond.to(dtype) if isinstance(cond, torch.Tensor) and cond.is_floating_point() else cond


def call_model(model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    """Run a diffusers UNet or transformer with the keyword names it expects; drop a learned-sigma half."""
    cond = dict(cond or {})
    dtype = next(model.parameters()).dtype
    x_in = x.to(dtype)
    cond = _cast_floats(cond, dtype)
    timestep = timestep.to(x.device)
    if _first_forward_arg(model) == "hidden_states":  # Transformer2DModel (DiT), SD3Transformer2DModel, ...
        out = model(hidden_states=x_in, timestep=timestep, **cond, return_dict=False)[0]
    else:
        if "encoder_hidden_states" in inspect.signature(model.forward).parameters:
            cond.setdefault("encoder_hidden_states", None)
        out = model(x_in, timestep, **cond, return_dict=False)[0]
    if out.shape[1] == 2 * x.shape[1]:  # learned variance (DiT): keep the mean prediction
        out = out[:, : x.shape[1]]
    return out.float()


class Denoiser(nn.Module):
    """x0 / eps / v / velocity of a wrapped network at continuous t in [0, 1] (t=0 is clean)."""

    prediction_type: str = ""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, null_cond: dict | None = None):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.null_cond = null_cond  # batch-1 model kwargs meaning "no condition"; None if unconditional

    # -- the one hook each parameterization overrides ------------------------------------------
    def from_output(self, out, x, a, s) -> Prediction:
        raise NotImplementedError

    def training_target(self, x0, noise, a, s) -> torch.Tensor:
        """What the raw network output should equal for x_t = a x0 + s noise (its own parameterization)."""
        raise NotImplementedError

    def to_output(self, x0, eps, a, s) -> torch.Tensor:
        """Raw network output that would give (x0, eps): the inverse of from_output."""
        return self.training_target(x0, eps, a, s)

    # -- shared ----------------------------------------------------------------------------------
    def alpha_sigma(self, t, like):
        a, s = self.schedule.alpha_sigma(t)
        return _bcast(a.to(like.device), like), _bcast(s.to(like.device), like)

    def add_noise(self, x0, noise, t):
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def raw(self, x, t, cond=None):
        """The network's own output at continuous t."""
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        return call_model(self.model, x, self.schedule.model_timestep(t), cond or {})

    def predict(self, x, t, cond=None, guidance=None) -> Prediction:
        """(x0, eps) at (x, t), with classifier-free guidance w when given (w=1: none)."""
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        a, s = self.alpha_sigma(t, x)
        if guidance is None or (not torch.is_tensor(guidance) and guidance == 1):
            return self.from_output(self.raw(x, t, cond), x.float(), a, s)
        if self.null_cond is None:
            raise StepdistillError("classifier-free guidance needs a conditional teacher with a null condition")
        n = x.shape[0]
        uncond = {**(cond or {}), **repeat_cond(self.null_cond, n, x.device)}
        out = self.raw(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond or {}, uncond))
        pc = self.from_output(out[:n], x.float(), a, s)
        pu = self.from_output(out[n:], x.float(), a, s)
        w = _bcast(torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(n), x)
        return Prediction(pu.x0 + w * (pc.x0 - pu.x0), pu.eps + w * (pc.eps - pu.eps))

    def x0(self, x, t, cond=None, guidance=None):
        return self.predict(x, t, cond, guidance).x0

    def eps(self, x, t, cond=None, guidance=None):
        return self.predict(x, t, cond, guidance).eps

    def v(self, x, t, cond=None, guidance=None):
        """The VP v-target a eps - s x0 (for flow schedules, the same formula with a = 1 - t)."""
        p = self.predict(x, t, cond, guidance)
        a, s = self.alpha_sigma(torch.as_tensor(t, device=x.device).float().expand(x.shape[0]), x)
        return a * p.eps - s * p.x0

    def velocity(self, x, t, cond=None, guidance=None):
        """Flow-matching velocity eps - x0 (dx/dt for a flow schedule)."""
        p = self.predict(x, t, cond, guidance)
        return p.eps - p.x0

    def with_model(self, model: nn.Module, prediction_type: str | None = None) -> "Denoiser":
        """The same schedule and null condition around another network (a student)."""
        cls = PARAMETERIZATIONS[prediction_type or self.prediction_type]
        return cls(model, self.schedule, self.null_cond)


class EpsDenoiser(Denoiser):
    prediction_type = "epsilon"

    def from_output(self, out, x, a, s):
        return Prediction((x - s * out) / a, out)

    def training_target(self, x0, noise, a, s):
        return noise


class VDenoiser(Denoiser):
    prediction_type = "v_prediction"

    def from_output(self, out, x, a, s):
        # VP: a^2 + s^2 = 1 gives x0 = a x - s v, eps = s x + a v
        norm = a * a + s * s
        return Prediction((a * x - s * out) / norm, (s * x + a * out) / norm)

    def training_target(self, x0, noise, a, s):
        return a * noise - s * x0


class X0Denoiser(Denoiser):
    prediction_type = "sample"

    def from_output(self, out, x, a, s):
        return Prediction(out, (x - a * out) / s.clamp(min=1e-8))

    def training_target(self, x0, noise, a, s):
        return x0


class FlowDenoiser(Denoiser):
    """Velocity u = eps - x0 for x_t = (1 - t) x0 + t eps (SD3, Flux, rectified flow)."""

    prediction_type = "flow"

    def from_output(self, out, x, a, s):
        # a = 1 - t, s = t:  x0 = x - t u,  eps = x + (1 - t) u
        return Prediction(x - s * out, x + a * out)

    def training_target(self, x0, noise, a, s):
        return noise - x0


PARAMETERIZATIONS: dict[str, type[Denoiser]] = {
    "epsilon": EpsDenoiser,
    "v_prediction": VDenoiser,
    "sample": X0Denoiser,
    "flow": FlowDenoiser,
}


def denoiser_for(model: nn.Module, scheduler_config, null_cond: dict | None = None) -> Denoiser:
    """Pick the schedule and parameterization from a diffusers scheduler config."""
    schedule = schedule_from_scheduler_config(scheduler_config)
    if isinstance(schedule, FlowSchedule):
        kind = "flow"
    else:
        kind = scheduler_config.get("prediction_type", "epsilon")
        if kind not in PARAMETERIZATIONS:
            raise StepdistillError(f"unsupported prediction_type {kind!r}; use epsilon, v_prediction or sample")
    assert isinstance(schedule, (VPSchedule, FlowSchedule))
    return PARAMETERIZATIONS[kind](model, schedule, null_cond)
