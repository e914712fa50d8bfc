"""Plain diffusion training (denoising score matching), used to train the embedded teacher.

Not a distiller: it trains the pipeline's own network in its own parameterization (the
Denoiser's training target: eps, v, x0, or a flow-matching velocity eps - x0), with label dropout so
that classifier-free guidance works. A flow teacher is sampled and exported with plain flow-matching
Euler (no x0 clipping), so its own sampler and its diffusers FlowMatchEulerDiscreteScheduler agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from ..conditioning import drop_conditions
from ..config import check_range, option
from ..samplers import sample_ode
from ..schedules import FlowSchedule, sample_logit_normal, sample_training_times
from .base import Distiller, DistillerConfig, register


@dataclass
class DiffusionConfig(DistillerConfig):
    label_dropout: float = option(0.1, "probability of training on the null condition (enables classifier-free guidance)")
    timesteps: Literal["uniform", "logit_normal"] = option("uniform", "training time distribution")
    sample_guidance: float = option(1.0, "guidance scale of the sample grids")

    def __post_init__(self):
        check_range("distill.label_dropout", self.label_dropout, 0, 1)


@register("diffusion")
class DiffusionTraining(Distiller):
    config_class = DiffusionConfig
    hidden = True  # trains teachers; not a distillation method
    sampler_name = "ddim"
    paper = {"title": "Denoising Diffusion Probabilistic Models", "arxiv": "2006.11239"}

    def __init__(self, teacher, config: DiffusionConfig):
        super().__init__(teacher, config)
        self.teacher.model.requires_grad_(True).train().float()
        self.student_denoiser = self.teacher  # the network trained is the pipeline's own
        self.flow = isinstance(self.teacher.schedule, FlowSchedule)
        self.sampler_name = "euler" if self.flow else "ddim"

    def frozen_modules(self):
        return [self.codec]

    def sample_times(self, n: int, device) -> torch.Tensor:
        if self.config.timesteps == "logit_normal":
            return sample_logit_normal(n, device=device).clamp(1e-4, 1.0)
        return sample_training_times(self.teacher.schedule, n, device)

    def loss(self, batch, step, network):
        x0, cond = self.teacher_info.encode_batch(batch, self.device)
        cond = drop_conditions(cond, self.teacher.null_cond, self.config.label_dropout)
        t = self.sample_times(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        a, s = self.teacher.alpha_sigma(t, x0)
        out = self.teacher.raw(a * x0 + s * noise, t, cond)
        target = self.teacher.training_target(x0, noise, a, s)
        return {"loss": torch.mean((out - target) ** 2)}

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale=None):
        den = self.teacher.with_model(networks["student"]) if networks is not None else self.teacher
        grid = self.teacher.schedule.sampling_grid(steps, "trailing")
        w = self.config.sample_guidance if guidance_scale is None else guidance_scale
        return sample_ode(den, noise, grid, {"cond": cond, "guidance": w}, clip_x0=None if self.flow else 1.0)

    def eval_guidance_scales(self):
        return [self.config.sample_guidance]

    def export_scheduler(self, steps):
        cfg = self.teacher_info.pipeline.scheduler.config
        if self.flow:
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        return DDIMScheduler.from_config(cfg, timestep_spacing="trailing", clip_sample=True)
