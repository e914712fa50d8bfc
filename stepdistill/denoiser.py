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


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP / FSDP / torch.compile wrapper (the trainer may wrap trainable networks)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if _is_parallel(model) else None)
        if inner is None:
            return model
        model = inner


def _is_parallel(model: nn.Module) -> bool:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DataParallel, DistributedDataParallel)):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


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


class ModelCall:
    """How to call a diffusers UNet or transformer, read from its forward signature once.

    Transformers (DiT, SD3, Flux) take `hidden_states=` by keyword; UNets take the sample first and, when
    they have cross-attention inputs, an explicit `encoder_hidden_states` (None for class-conditional ones).
    The call goes to `model` as given, which may be a DDP/FSDP wrapper of the network read here.
    """

    def __init__(self, model: nn.Module):
        params = inspect.signature(unwrap(model).forward).parameters
        names = list(params)
        self.keyword_input = bool(names) and names[0] == "hidden_states"
        self.needs_encoder_states = "encoder_hidden_states" in params

    def __call__(self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        cond = _cast_floats(dict(cond or {}), dtype)
        timestep = timestep.to(x.device)
        if self.keyword_input:
            out = model(hidden_states=x.to(dtype), timestep=timestep, **cond, return_dict=False)[0]
        else:
            if self.needs_encoder_states:
                cond.setdefault("encoder_hidden_states", None)
            out = model(x.to(dtype), timestep, **cond, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (DiT): keep the mean prediction
            out = out[:, : x.shape[1]]
        return out.float()


def call_model(model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    """Run a diffusers UNet or transformer once (pipelines; the Denoiser keeps its ModelCall)."""
    return ModelCall(model)(model, x, timestep, cond)


class _FeaturesReady(Exception):
    """Raised by the feature hook to stop the forward pass once the requested layer has run."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def default_feature_layer(model: nn.Module) -> str:
    """The bottleneck: a UNet's mid_block, a transformer's middle block (DMD2's GAN head reads it)."""
    model = unwrap(model)
    if getattr(model, "mid_block", None) is not None:
        return "mid_block"
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return f"transformer_blocks.{len(blocks) // 2}"
    raise StepdistillError(f"{type(model).__name__} has no mid_block or transformer_blocks: name the feature layer")


class Denoiser(nn.Module):
    """x0 / eps of a wrapped network at continuous t in [0, 1] (t=0 is clean)."""

    prediction_type: str = ""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, null_cond: dict | None = None):
        super().__init__()
        if self.prediction_type not in FITS[type(schedule)]:
            raise StepdistillError(f"a {self.prediction_type!r} network does not fit a {type(schedule).__name__}; "
                                   f"use one of {', '.join(FITS[type(schedule)])}")
        self.model = model
        self.schedule = schedule
        self.null_cond = null_cond  # batch-1 model kwargs meaning "no condition"; None if unconditional
        self._call = ModelCall(model) if model is not None else None
        self._null_on: dict[torch.device, dict] = {}  # the null condition, moved to each device once

    @property
    def network(self) -> nn.Module:
        """The network itself (the trainer may have wrapped `model` for DDP or FSDP)."""
        return unwrap(self.model)

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
        a, s = self.schedule.alpha_sigma(torch.as_tensor(t, device=like.device))
        return _bcast(a, like), _bcast(s, like)

    def add_noise(self, x0, noise, t):
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def raw(self, x, t, cond=None):
        """The network's own output at continuous t."""
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        return self._call(self.model, x, self.schedule.model_timestep(t), cond or {})

    def null_for(self, n: int, device) -> dict:
        device = torch.device(device)
        if device not in self._null_on:
            self._null_on[device] = repeat_cond(self.null_cond, 1, device)
        return repeat_cond(self._null_on[device], n)

    def predict(self, x, t, cond=None, guidance=None) -> Prediction:
        """(x0, eps) at (x, t), with classifier-free guidance w when given (w=1: none)."""
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        a, s = self.alpha_sigma(t, x)
        if guidance is None or (not torch.is_tensor(guidance) and guidance == 1):
            return self.from_output(self.raw(x, t, cond), x.float(), a, s)
        if self.null_cond is None:
            raise StepdistillError("classifier-free guidance needs a conditional teacher with a null condition")
        n = x.shape[0]
        uncond = {**(cond or {}), **self.null_for(n, x.device)}
        out = self.raw(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond or {}, uncond))
        pc = self.from_output(out[:n], x.float(), a, s)
        pu = self.from_output(out[n:], x.float(), a, s)
        w = _bcast(torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(n), x)
        return Prediction(pu.x0 + w * (pc.x0 - pu.x0), pu.eps + w * (pc.eps - pu.eps))

    def x0(self, x, t, cond=None, guidance=None):
        return self.predict(x, t, cond, guidance).x0

    def eps(self, x, t, cond=None, guidance=None):
        return self.predict(x, t, cond, guidance).eps

    def features(self, x, t, cond=None, layer: str | None = None) -> torch.Tensor:
        """The output of one layer of the network at (x, t) (default: the bottleneck), with gradients.

        The forward pass stops at that layer, so the layers after it cost nothing; a tuple output (a
        transformer block's (text, image) streams) gives its last tensor."""
        layer = layer or default_feature_layer(self.network)
        try:
            module = self.network.get_submodule(layer)
        except AttributeError:
            raise StepdistillError(f"{type(self.network).__name__} has no layer {layer!r}") from None

        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = [o for o in output if torch.is_tensor(o)][-1]
            raise _FeaturesReady(output)

        handle = module.register_forward_hook(hook)
        try:
            self.raw(x, t, cond)
        except _FeaturesReady as ready:
            return ready.value.float()
        finally:
            handle.remove()
        raise StepdistillError(f"layer {layer!r} did not run in the forward pass")

    def with_model(self, model: nn.Module, prediction_type: str | None = None,
                   schedule: NoiseSchedule | None = None) -> "Denoiser":
        """Another network (a student) with this null condition, in its own parameterization and schedule.

        A student whose time axis differs from the teacher's (a flow student of a VP teacher) passes its
        schedule; a parameterization that does not fit the schedule is refused."""
        kind = prediction_type or self.prediction_type
        if kind not in PARAMETERIZATIONS:
            raise StepdistillError(f"unknown prediction type {kind!r}; use one of {', '.join(PARAMETERIZATIONS)}")
        return PARAMETERIZATIONS[kind](model, schedule or self.schedule, self.null_cond)


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


# which parameterizations each schedule's time axis supports: a velocity u = eps - x0 is dx/dt only for
# a = 1 - t, s = t, and diffusers' v = a eps - s x0 is defined for VP schedules (a^2 + s^2 = 1)
FITS = {VPSchedule: ("epsilon", "v_prediction", "sample"), FlowSchedule: ("flow", "sample", "epsilon")}

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
    return PARAMETERIZATIONS[kind](model, schedule, null_cond)
