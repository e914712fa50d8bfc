"""A VP-trained network asked in flow time: the velocity of x_t = (1 - t) x0 + t eps from a DDPM/DDIM network.

Flow time t has signal-to-noise ratio (1 - t)^2 / t^2. Dividing x_flow by c = sqrt((1 - t)^2 + t^2) gives
x_flow / c = a x0 + s eps with a = (1 - t) / c, s = t / c and a^2 + s^2 = 1: a VP point, at the VP time tau
whose alpha-bar is (1 - t)^2 / c^2 (found by inverting the VP table). The network's VP prediction at
(x_flow / c, tau) gives (x0, eps), and the flow velocity is u = eps - x0; where the VP schedule stops short
of SNR 0 (the last few 1e-5 of flow time) u = (x_flow - x0) / t keeps the flow x0 equal to the VP one.

VPAsFlow is a diffusers model (ModelMixin), so a student that starts from a VP teacher is a flow model that
saves, loads (`from stepdistill import ...` registers it) and runs in a flow-matching pipeline as any other.
"""

from __future__ import annotations

import diffusers
import torch
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, ModelMixin, SchedulerMixin  # noqa: F401
# (diffusers finds how to load a component of a module through the ModelMixin / SchedulerMixin names in it)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from .denoiser import PARAMETERIZATIONS, ModelCall
from .errors import StepdistillError
from .schedules import VPSchedule, _bcast


class VPAsFlow(ModelMixin, ConfigMixin):
    """`network` (trained on a VP schedule with `vp_prediction_type`) as a flow-velocity model on timesteps t*T."""

    ignore_for_config = ["network"]

    @register_to_config
    def __init__(self, network_class: str, network_config: dict, vp_scheduler_config: dict,
                 vp_prediction_type: str = "epsilon", num_train_timesteps: int = 1000,
                 in_channels: int | None = None, sample_size: int | None = None,
                 time_cond_proj_dim: int | None = None, network: torch.nn.Module | None = None):
        super().__init__()
        cls = getattr(diffusers, network_class, None)
        if cls is None:
            raise StepdistillError(f"VPAsFlow: diffusers has no network class {network_class!r}")
        if vp_prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise StepdistillError(f"VPAsFlow: unsupported VP prediction type {vp_prediction_type!r}")
        self.network = network if network is not None else cls.from_config(network_config)
        self.vp = PARAMETERIZATIONS[vp_prediction_type](None, VPSchedule.from_scheduler_config(vp_scheduler_config))
        self._call = ModelCall(self.network)

    @classmethod
    def wrap(cls, network: torch.nn.Module, vp_scheduler_config, vp_prediction_type: str) -> "VPAsFlow":
        """A VPAsFlow around `network` itself (not a copy): its weights are the wrapper's."""
        cfg = {k: v for k, v in network.config.items() if not k.startswith("_")}
        return cls(type(network).__name__, cfg, dict(vp_scheduler_config), vp_prediction_type,
                   in_channels=cfg.get("in_channels"), sample_size=cfg.get("sample_size"),
                   time_cond_proj_dim=cfg.get("time_cond_proj_dim"), network=network)

    def vp_time(self, abar: torch.Tensor) -> torch.Tensor:
        """The VP time tau in [0, 1] with alpha-bar(tau) = abar, inverting VPSchedule's log-linear table."""
        schedule = self.vp.schedule
        neg = -schedule.log_table.to(abar.device)  # ascending, 0 at tau = 0
        q = (-abar.double().clamp(min=1e-300).log()).clamp(0, float(neg[-1]))
        i = (torch.searchsorted(neg, q) - 1).clamp(0, schedule.num_train_timesteps - 1)
        frac = ((q - neg[i]) / (neg[i + 1] - neg[i])).clamp(0, 1)
        return (i + frac) / schedule.num_train_timesteps

    def forward(self, sample, timestep, *args, return_dict: bool = True, **cond):
        if args:  # a UNet2DConditionModel's positional encoder_hidden_states
            cond["encoder_hidden_states"] = args[0]
        x = sample.float()
        t = (torch.as_tensor(timestep, device=x.device).double() / self.config.num_train_timesteps).expand(x.shape[0])
        c = torch.sqrt((1 - t) ** 2 + t ** 2)
        tau = self.vp_time(((1 - t) / c) ** 2)
        x_vp = x / _bcast(c.float(), x)
        a, s = self.vp.alpha_sigma(tau.float(), x)
        out = self._call(self.network, x_vp, self.vp.schedule.model_timestep(tau), cond)
        x0, eps = self.vp.from_output(out, x_vp, a, s)
        tb = _bcast(t.float(), x)
        velocity = torch.where(tb > 0.5, (x - x0) / tb.clamp(min=0.5), eps - x0).to(sample.dtype)
        return UNet2DOutput(sample=velocity) if return_dict else (velocity,)


class VPPipelineFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler for pipelines written for VP schedulers (StableDiffusionPipeline), which read
    `init_noise_sigma` and call `scale_model_input`: 1 and the identity, as flow matching needs."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample


def base_network(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers network itself (inside a VPAsFlow wrapper, or the model as given)."""
    return model.network if isinstance(model, VPAsFlow) else model
