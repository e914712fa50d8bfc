"""Noise schedules on one continuous time t in [0, 1] (t=0 is clean data), and timestep samplers.

Every schedule writes x_t = alpha(t) * x0 + sigma(t) * noise. A diffusers VP schedule with T
training steps puts its discrete timestep k at t = (k + 1) / T, so that t = 0 is the clean
end (alpha = 1, DDIM's `set_alpha_to_one`) and t = 1 is timestep T - 1. A flow-matching
schedule uses t = sigma directly: alpha = 1 - t, sigma = t, model timestep = t * T.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConfigError, StepdistillError


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example tensor (B,) so it broadcasts against `like` (B, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


# What each diffusers scheduler setting does to a teacher's schedule (issue 12: never ignore one).
# Settings of how a diffusers sampler walks the schedule (its inference grid, step rule, clipping, boundary
# conditions): they do not change the noise levels the network was trained at, and stepdistill's own samplers
# choose their grids themselves (students export their own schedulers), so they are read by no one here.
SAMPLER_SETTINGS = frozenset({
    "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "variance_type", "skip_prk_steps", "interpolation_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max", "final_sigmas_type",
    "timestep_type", "solver_order", "solver_type", "algorithm_type", "lower_order_final", "euler_at_final",
    "lambda_min_clipped", "use_lu_lambdas", "predict_x0", "solver_p", "disable_corrector", "original_inference_steps",
    "timestep_scaling", "prediction_type",
    "gamma"})  # prediction_type is the Denoiser's parameterization, read there; gamma is TCD's stochastic step
# (stepdistill.pipelines.FlowGridScheduler), which re-noises between steps but leaves the noise levels as they are
VP_SETTINGS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                         "rescale_betas_zero_snr", "set_alpha_to_one"})
VP_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
# VP sampler settings that would change the noise levels themselves: refused when set
VP_REFUSED = {"timestep_type": ("discrete", None), "use_flow_sigmas": (False, None),
              "use_dynamic_shifting": (False, None), "shift_terminal": (None,)}
VP_INERT = frozenset({"flow_shift", "time_shift_type"})  # read by DPMSolver / UniPC only with flow sigmas (refused)
FLOW_SETTINGS = frozenset({"num_train_timesteps", "shift"})
# FlowMatchEulerDiscreteScheduler settings that move its sigmas away from shift(t): refused unless at these values
FLOW_REFUSED = {
    "use_dynamic_shifting": (False, None), "shift_terminal": (None,), "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None), "invert_sigmas": (False, None),
    "stochastic_sampling": (False, None)}
# read by diffusers only under use_dynamic_shifting (refused above), so inert otherwise
FLOW_INERT = frozenset({"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"})
FLOW_HINTS = {
    "use_dynamic_shifting": "Flux's resolution-dependent mu: save the scheduler with use_dynamic_shifting=False and "
                            "shift=exp(mu) for the teacher's resolution (diffusers' calculate_shift(image_seq_len, "
                            "base_image_seq_len, max_image_seq_len, base_shift, max_shift)), which is the same "
                            "sigma schedule at that resolution",
    "stochastic_sampling": "students would be sampled with fresh noise they were not trained for; save it False",
}


def _check_settings(config, known: frozenset, refused: dict, kind: str, hints: dict | None = None) -> None:
    """Refuse a scheduler setting that changes the schedule in a way stepdistill does not model, and any
    setting it does not know, naming it; underscore keys (_class_name, _diffusers_version) are metadata."""
    name = config.get("_class_name", "scheduler")
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in refused:
            if value not in refused[key]:
                hint = (hints or {}).get(key, f"save the scheduler with {key}={refused[key][0]!r}")
                raise ConfigError(f"{name} setting {key}={value!r} changes the {kind} schedule in a way stepdistill "
                                  f"does not support: {hint}")
        elif key not in known and key not in SAMPLER_SETTINGS:
            raise ConfigError(f"{name} setting {key}={value!r} is unknown to stepdistill, which cannot tell how it "
                              f"changes the {kind} schedule; remove it from the scheduler config if it has no effect")


class NoiseSchedule:
    """alpha(t), sigma(t) and the timestep the network was trained on, at continuous t."""

    num_train_timesteps: int

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_of_timestep(self, timestep) -> torch.Tensor:
        raise NotImplementedError

    def sampling_grid(self, steps: int, spacing: str = "trailing") -> torch.Tensor:
        """Descending times t_0 > ... > t_steps = end, the teacher's few-step sampling grid."""
        raise NotImplementedError


class VPSchedule(NoiseSchedule):
    """Variance-preserving schedule from diffusers' alphas_cumprod (linear, scaled_linear, cosine)."""

    def __init__(self, alphas_cumprod: torch.Tensor, final_alpha_one: bool = True):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.num_train_timesteps = len(abar)
        # table[i] = abar at t = i / T; index 0 is the clean end
        self.table = torch.cat([torch.ones(1, dtype=torch.float64), abar])
        self.log_table = self.table.log()
        self._log_tables: dict[torch.device, torch.Tensor] = {}  # the table on each device it is used on
        self.final_alpha_one = final_alpha_one

    @classmethod
    def from_scheduler_config(cls, config) -> "VPSchedule":
        from diffusers import DDPMScheduler

        _check_settings(config, VP_SETTINGS | VP_INERT, VP_REFUSED, "VP")
        if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in VP_BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule={config['beta_schedule']!r} is not supported; use one of "
                              f"{', '.join(VP_BETA_SCHEDULES)} or give trained_betas")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
        sched = DDPMScheduler(**kwargs)
        return cls(sched.alphas_cumprod, final_alpha_one=config.get("set_alpha_to_one", True))

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        pos = t.double().clamp(0, 1) * self.num_train_timesteps
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo
        table = self._log_tables.get(t.device)
        if table is None:
            table = self._log_tables[t.device] = self.log_table.to(t.device)
        lo = lo.long()
        log_interp = table[lo] * (1 - frac) + table[lo + 1] * frac
        # a zero-terminal-SNR schedule ends at abar = 0, whose log is -inf: the last interval interpolates abar
        # itself (finite, monotone, exact at both ends) instead of 0 * -inf = NaN
        upper = table[lo + 1].exp()
        linear = table[lo].exp() * (1 - frac) + upper * frac
        return torch.where(upper > 0, log_interp.exp(), linear)

    def alpha_sigma(self, t):
        abar = self._abar(torch.as_tensor(t))
        return abar.sqrt().float(), (1 - abar).clamp(min=0).sqrt().float()

    def model_timestep(self, t):
        ts = torch.as_tensor(t).double() * self.num_train_timesteps - 1
        rounded = ts.round()
        ts = torch.where((ts - rounded).abs() < 1e-4, rounded, ts)
        return ts.clamp(min=0).float()

    def t_of_timestep(self, timestep):
        return (torch.as_tensor(timestep).double() + 1) / self.num_train_timesteps

    def end_time(self) -> float:
        """The time a full DDIM run lands on: the clean end, or timestep 0 without set_alpha_to_one."""
        return 0.0 if self.final_alpha_one else 1.0 / self.num_train_timesteps

    def sampling_grid(self, steps, spacing="trailing", steps_offset: int = 0):
        T = self.num_train_timesteps
        if spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        elif spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + steps_offset
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
        else:
            raise StepdistillError(f"unknown timestep spacing {spacing!r}; use trailing, leading or linspace")
        t = self.t_of_timestep(torch.from_numpy(ts.copy()))
        if spacing == "leading":
            # DDIM's previous timestep is t - T//steps; below zero it is the clean end
            prev = ts - T // steps
            end = self.t_of_timestep(torch.tensor(prev[-1])) if prev[-1] >= 0 else torch.tensor(self.end_time())
        else:
            end = torch.tensor(self.end_time(), dtype=torch.float64)
        return torch.cat([t, end.reshape(1).double()]).float()


class FlowSchedule(NoiseSchedule):
    """Rectified-flow / flow-matching schedule (SD3, Flux): x_t = (1 - t) x0 + t noise."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift

    @classmethod
    def from_scheduler_config(cls, config) -> "FlowSchedule":
        """num_train_timesteps and shift; FlowMatchEulerDiscreteScheduler settings that move its sigmas elsewhere
        (dynamic shifting, shift_terminal, Karras / exponential / beta sigmas, inverted sigmas) are refused."""
        _check_settings(config, FLOW_SETTINGS | FLOW_INERT, FLOW_REFUSED, "flow-matching", FLOW_HINTS)
        return cls(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))

    def alpha_sigma(self, t):
        t = torch.as_tensor(t).float()
        return 1 - t, t

    def model_timestep(self, t):
        return torch.as_tensor(t).float() * self.num_train_timesteps

    def t_of_timestep(self, timestep):
        return torch.as_tensor(timestep).double() / self.num_train_timesteps

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        """SD3's time shift: t -> shift t / (1 + (shift - 1) t)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def end_time(self) -> float:
        return 0.0

    def sampling_grid(self, steps, spacing="trailing"):
        """'trailing': FlowMatchEulerDiscreteScheduler.set_timesteps(steps) (the teacher's own few-step grid: a
        linspace between its already shifted training sigmas, shifted once more; its last nonzero sigma is
        shifted(shifted(1/T)), 0.009 at shift 3). 'shifted': shifted(k / steps), k = steps .. 0, the grid
        students train and sample on (PCM's SD3 phase edges; Flux's pipeline default); it nests: the grid for
        N steps is every other point of the one for 2N."""
        if spacing == "shifted":
            return self.shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()
        if spacing != "trailing":
            raise StepdistillError(f"unknown flow grid spacing {spacing!r}; use trailing (the teacher scheduler's) "
                                   "or shifted (shift(k / steps))")
        T = self.num_train_timesteps
        lowest = self.shifted(torch.tensor(1.0 / T, dtype=torch.float64))
        t = torch.linspace(1.0, float(lowest), steps, dtype=torch.float64)
        return torch.cat([self.shifted(t), torch.zeros(1, dtype=torch.float64)]).float()

    def unshifted(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `shifted`: the sigmas to hand FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...),
        which shifts what it is given."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return t / (self.shift - (self.shift - 1) * t)


def schedule_from_scheduler_config(config) -> NoiseSchedule:
    """The NoiseSchedule behind any diffusers scheduler config."""
    name = config.get("_class_name", "")
    if "FlowMatch" in name or ("shift" in config and "beta_schedule" not in config):
        return FlowSchedule.from_scheduler_config(config)
    if "beta_schedule" in config or "trained_betas" in config:
        return VPSchedule.from_scheduler_config(config)
    raise StepdistillError(f"unsupported scheduler {name!r}: stepdistill handles VP (DDPM/DDIM-style) and flow-matching schedulers")


# ----------------------------------------------------------------------------- timestep samplers


def sample_training_times(schedule: NoiseSchedule, n: int, device=None) -> torch.Tensor:
    """Uniform training times: a VP schedule's discrete timesteps (where its network was trained), else t in (0, 1]."""
    if isinstance(schedule, VPSchedule):
        k = torch.randint(0, schedule.num_train_timesteps, (n,), device=device)
        return schedule.t_of_timestep(k).float()
    return torch.rand(n, device=device).clamp(min=1e-4)


def sample_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, device=None, generator=None) -> torch.Tensor:
    """SD3's training distribution: t = sigmoid(N(mean, std))."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def sample_u_shaped(n: int, a: float = 4.0, device=None, generator=None) -> torch.Tensor:
    """Rectified flow++'s U-shaped distribution p(t) proportional to cosh(a (t - 1/2)) on [0, 1]."""
    u = torch.rand(n, device=device, generator=generator)
    # inverse CDF of p(u) = a e^{au} / (e^a - 1), mirrored for half of the draws
    x = torch.log1p(u * math.expm1(a)) / a
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    t = torch.where(flip, 1 - x, x)
    return t * (1 - 2e-5) + 1e-5
