"""Consistency distillation (Song et al. 2023) in the latent-consistency form (Luo et al. 2023).

The student is f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t) with the LCM boundary scalings
on the network's own timestep (sigma_data 0.5, timestep scaling 10), which is exactly what
diffusers' LCMScheduler applies at sampling, so the exported student loads in plain diffusers.
Training pairs come from the teacher's skipping-step ODE step on a grid of N times
(t_n = n / N; for T = 1000 and N = 50, timesteps 19, 39, ..., 999):

    loss = d( f_theta(x_{t_n}, t_n),  sg f_target(Phi_teacher(x_{t_n}; t_n -> t_{n-1}), t_{n-1}) )

where the target network is an EMA of the student (rate 0.95 by default) and d is the
pseudo-Huber distance. t_0 = 0 is the clean end, where f is the identity.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import LCMScheduler
from torch import nn

from .. import solvers
from ..conditioning import guidance_embedding
from ..config import check_range, option
from ..errors import ConfigError
from .base import Distiller, DistillerConfig, register


@dataclass
class ConsistencyConfig(DistillerConfig):
    num_ddim_timesteps: int = option(50, "N: points of the teacher grid; the skipping interval is T / N timesteps (LCM: 50)")
    solver: Literal["ddim", "euler", "heun"] = option("ddim", "teacher ODE step across one skipping interval")
    target: Literal["ema", "online"] = option("ema", "target network: EMA of the student, or the student under stop-gradient")
    target_ema_decay: float = option(0.95, "EMA rate of the target network (LCM and CD: 0.95)")
    loss: Literal["huber", "l2"] = option("huber", "distance d: elementwise pseudo-Huber sqrt(diff^2 + c^2) - c, or squared L2")
    huber_c: float = option(0.001, "pseudo-Huber c (LCM: 0.001)")
    timestep_scaling: float = option(10.0, "boundary scalings use timestep * scaling (LCMScheduler's timestep_scaling)")
    sigma_data: float = option(0.5, "boundary scalings' sigma_data (LCMScheduler fixes 0.5)")
    guidance_scale_min: float = option(1.0, "teacher CFG scale (diffusers convention, 1 = none) drawn per example from [min, max]")
    guidance_scale_max: float = option(1.0, "upper end of the teacher CFG range (LCM: w in [5, 15] in its own convention = 6..16 here)")
    guidance_embedding: bool = option(False, "feed the CFG scale to the student as LCM's w-embedding (timestep_cond)")
    guidance_embedding_dim: int = option(256, "size of the w-embedding (time_cond_proj_dim)")

    def __post_init__(self):
        check_range("distill.num_ddim_timesteps", self.num_ddim_timesteps, 2, 1000)
        check_range("distill.target_ema_decay", self.target_ema_decay, 0, 1)
        check_range("distill.huber_c", self.huber_c, 0, low_open=True)
        check_range("distill.guidance_scale_min", self.guidance_scale_min, 0)
        if self.guidance_scale_max < self.guidance_scale_min:
            raise ConfigError(f"distill.guidance_scale_max = {self.guidance_scale_max} is below "
                              f"distill.guidance_scale_min = {self.guidance_scale_min}")


def copy_student(model: nn.Module, **config_changes) -> nn.Module:
    """A trainable fp32 copy of the teacher network, optionally with config changes (new inputs start at zero)."""
    if not config_changes:
        student = copy.deepcopy(model)
    else:
        params = inspect.signature(type(model).__init__).parameters
        bad = [k for k in config_changes if k not in params]
        if bad:
            raise ConfigError(f"{type(model).__name__} has no config option {bad[0]!r}; "
                              "this method option needs a network that supports it (e.g. UNet2DConditionModel)")
        student = type(model).from_config({**model.config, **config_changes})
        missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
        if unexpected:
            raise ConfigError(f"teacher weights do not fit the student: unexpected keys {unexpected[:3]}")
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name in missing:
                    p.zero_()
    return student.float().requires_grad_(True).train()


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt(d^2 + c^2) - c), written as d^2 / (sqrt(d^2 + c^2) + c) so small d keep their precision."""
    d2 = (x.float() - y.float()) ** 2
    return torch.mean(d2 / (torch.sqrt(d2 + c * c) + c))


@register("cd")
class ConsistencyDistiller(Distiller):
    """CD with the LCM boundary parameterization, skipping-step teacher steps and an EMA target."""

    config_class = ConsistencyConfig
    paper = {"title": "Consistency Models", "arxiv": "2303.01469"}
    sampler_name = "consistency"

    def __init__(self, teacher, config: ConsistencyConfig):
        super().__init__(teacher, config)
        extra = {"time_cond_proj_dim": config.guidance_embedding_dim} if config.guidance_embedding else {}
        self.student_denoiser = self.teacher.with_model(copy_student(self.teacher.model, **extra))
        T = self.teacher.schedule.num_train_timesteps
        if T % config.num_ddim_timesteps:
            raise ConfigError(f"distill.num_ddim_timesteps = {config.num_ddim_timesteps} must divide the teacher's "
                              f"{T} training timesteps")

    @property
    def student(self):
        return self.student_denoiser.model

    def ema_rates(self):
        return {"target": self.config.target_ema_decay} if self.config.target == "ema" else {}

    # -- the consistency function ------------------------------------------------------------
    def boundary(self, t: torch.Tensor, like: torch.Tensor):
        """LCM's c_skip, c_out at continuous t (from the network timestep, as LCMScheduler)."""
        scaled = self.teacher.schedule.model_timestep(t).to(like.device) * self.config.timestep_scaling
        sd2 = self.config.sigma_data ** 2
        c_skip = sd2 / (scaled ** 2 + sd2)
        c_out = scaled / (scaled ** 2 + sd2).sqrt()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return c_skip.reshape(shape), c_out.reshape(shape)

    def consistency_fn(self, denoiser, x, t, cond):
        c_skip, c_out = self.boundary(t, x)
        return c_skip * x + c_out * denoiser.x0(x, t, cond)

    def grid_times(self, idx: torch.Tensor) -> torch.Tensor:
        """t_n = n / N on the skipping grid (n = 0 is the clean end)."""
        return idx.float() / self.config.num_ddim_timesteps

    def student_cond(self, cond: dict, w: torch.Tensor | None) -> dict:
        if not self.config.guidance_embedding:
            return cond
        w = torch.ones(next(iter(cond.values())).shape[0]) if w is None else w
        emb = guidance_embedding(w - 1.0, self.config.guidance_embedding_dim)
        return {**cond, "timestep_cond": emb.to(self.device)}

    def draw_guidance(self, n: int, device) -> torch.Tensor | None:
        lo, hi = self.config.guidance_scale_min, self.config.guidance_scale_max
        if lo == hi == 1.0:
            return None
        return lo + (hi - lo) * torch.rand(n, device=device)

    def target_denoiser(self):
        if self.config.target == "online":
            return self.student_denoiser
        return self.teacher.with_model(self.ema.module("target"))

    # -- training --------------------------------------------------------------------------------
    def loss(self, batch, step):
        x0, cond = self.teacher_info.encode_batch(batch, self.device)
        n = x0.shape[0]
        N = self.config.num_ddim_timesteps
        idx = torch.randint(1, N + 1, (n,), device=x0.device)
        t, t_prev = self.grid_times(idx), self.grid_times(idx - 1)
        x_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        w = self.draw_guidance(n, x0.device)
        s_cond = self.student_cond(cond, w)

        pred = self.consistency_fn(self.student_denoiser, x_t, t, s_cond)
        with torch.no_grad():
            x_prev = solvers.STEPS[self.config.solver](self.teacher, x_t, t, t_prev, cond, guidance=w)
            target = self.consistency_fn(self.target_denoiser(), x_prev, t_prev, s_cond)
        if self.config.loss == "huber":
            loss = pseudo_huber(pred, target, self.config.huber_c)
        else:
            loss = torch.mean((pred.float() - target.float()) ** 2)
        return {"student": loss}

    # -- sampling and export -----------------------------------------------------------------------
    def sampling_times(self, steps: int) -> torch.Tensor:
        """LCMScheduler's timesteps for `steps` steps, as grid times t_n (descending)."""
        N = self.config.num_ddim_timesteps
        if steps > N:
            raise ConfigError(f"{steps} sampling steps exceed the {N}-point consistency grid")
        idx = torch.arange(N, 0, -1)[torch.floor(torch.linspace(0, N, steps + 1)[:-1]).long()]
        return self.grid_times(idx)

    @torch.no_grad()
    def sample(self, noise, cond, steps, generator=None, model=None, guidance_scale: float | None = None):
        """Multistep consistency sampling: denoise with f, re-noise to the next time, repeat."""
        den = self.student_denoiser if model is None else self.teacher.with_model(model)
        w = None
        if self.config.guidance_embedding:
            scale = guidance_scale if guidance_scale is not None else self.config.guidance_scale_min
            w = torch.full((noise.shape[0],), scale)
        s_cond = self.student_cond(cond, w) if cond else cond
        times = self.sampling_times(steps).to(noise.device)
        x = noise
        for i, t in enumerate(times):
            x0 = self.consistency_fn(den, x, t.expand(x.shape[0]), s_cond)
            if i + 1 < len(times):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = self.teacher.add_noise(x0, z, times[i + 1].expand(x.shape[0]))
        return x0

    def export_scheduler(self, steps):
        cfg = self.teacher_info.pipeline.scheduler.config
        return LCMScheduler.from_config(
            cfg, original_inference_steps=self.config.num_ddim_timesteps, timestep_scaling=self.config.timestep_scaling,
            clip_sample=False, prediction_type=self.student_denoiser.prediction_type, set_alpha_to_one=True)

    def model_card(self):
        return {"sampling": "multistep consistency sampling (LCMScheduler); "
                            f"{self.config.num_ddim_timesteps}-point skipping grid"}
