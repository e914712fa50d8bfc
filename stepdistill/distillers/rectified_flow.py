"""Rectified flow: reflow (Liu et al. 2022; the improved recipe of Lee et al. 2024), InstaFlow and SlimFlow.

All three train on reflow pairs (z, x = teacher ODE(z)) from stepdistill.reflow_pairs (data.dataset: pairs) in
flow time, t = 1 noise, t = 0 data:

- reflow (arXiv 2209.03003, 2405.20320): x_t = t z + (1 - t) x, the student's velocity regressed onto z - x,
  with t uniform, logit-normal or RF++'s U-shaped p(t) ~ cosh(a (t - 1/2)); distance L2, pseudo-Huber, or RF++'s
  LPIPS-Huber (1 - t) PH(v_hat, v) + LPIPS(x_hat, x) with x_hat = x_t - t v_hat;
- instaflow (arXiv 2309.06380): one Euler step from t = 1, x_hat = z - v(z, 1), regressed onto x (LPIPS or
  pseudo-Huber), starting from a reflowed model (or the teacher);
- slimflow (arXiv 2407.12718): a smaller student (distill.student), first by annealing reflow (the noise of a
  pair moves from a fresh draw to the pair's own, z_used = sqrt(1 - b^2) z + b z_fresh, b = 1 - min(1, step / W)),
  then by flow-guided distillation (the one-step loss on pairs plus a target from a two-step path through the
  annealed model: z -> x_t along the student's own step, then the teacher's Euler step to 0).

A VP teacher is converted into flow time (stepdistill.flow_conversion.VPAsFlow): the student starts as the
teacher answering in flow time, and its Denoiser holds a FlowSchedule. Students sample with flow Euler and
export with FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..config import check_range, option
from ..errors import ConfigError, StepdistillError
from ..flow_conversion import VPAsFlow, VPPipelineFlowMatchScheduler, base_network
from ..pipelines import ClassConditionalPipeline
from ..losses import Distance
from ..samplers import sample_ode
from ..schedules import FlowSchedule, _bcast, sample_logit_normal, sample_u_shaped
from .. import reflow_pairs  # noqa: F401  (registers the reflow_pairs stage kind)
from .base import Distiller, DistillerConfig, register
from .common import StudentArchitecture, build_student

PAIRS_HINT = ("set data.dataset: pairs and data.path: a folder written by `stepdistill reflow-pairs` (or list a "
              "reflow_pairs stage under stages:, as training_configs/digits/reflow.yaml does)")


# ----------------------------------------------------------------------------- the math


def draw_times(kind: str, n: int, device, a: float = 4.0, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Flow times t in (0, 1): uniform (RF), logit-normal (SD3) or U-shaped with parameter a (RF++)."""
    if kind == "uniform":
        return torch.rand(n, device=device).clamp(1e-5, 1 - 1e-5)
    if kind == "logit_normal":
        return sample_logit_normal(n, mean, std, device=device)
    return sample_u_shaped(n, a, device=device)


def interpolate(noise: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path between a pair: x_t = t z + (1 - t) x."""
    tb = _bcast(t, noise)
    return tb * noise + (1 - tb) * sample


def annealed_noise(noise: torch.Tensor, fresh: torch.Tensor, beta: float) -> torch.Tensor:
    """SlimFlow's annealing: sqrt(1 - b^2) z_pair + b z_fresh (b = 1: random pairing, b = 0: the teacher's)."""
    return (1 - beta * beta) ** 0.5 * noise + beta * fresh


def anneal_beta(step: int, anneal_steps: int) -> float:
    """b = 1 - min(1, step / W): linear from random pairing to the teacher's coupling over W steps."""
    return 1.0 - min(1.0, step / anneal_steps) if anneal_steps > 0 else 0.0


# ----------------------------------------------------------------------------- shared by the three


@dataclass
class FlowPairsConfig(DistillerConfig):
    student: StudentArchitecture = field(default_factory=StudentArchitecture, metadata={
        "help": "the student network: the teacher's (default) or smaller, from scratch (SlimFlow)"})
    huber_c: float = option(0.001, "c of the elementwise pseudo-Huber distance 'huber' (LCM's value)")

    def __post_init__(self):
        check_range("distill.huber_c", self.huber_c, 0, low_open=True)


def as_flow_teacher(teacher):
    """The teacher's Denoiser in flow time: itself for flow teachers, VPAsFlow around the VP network otherwise."""
    den = teacher.denoiser
    if isinstance(den.schedule, FlowSchedule):
        return den
    wrapper = VPAsFlow.wrap(teacher.model, teacher.pipeline.scheduler.config, den.prediction_type)
    return den.with_model(wrapper, "flow", FlowSchedule(den.schedule.num_train_timesteps))


def flow_student(flow_model: torch.nn.Module, arch: StudentArchitecture) -> torch.nn.Module:
    """The student network: a copy of the flow-time teacher, or a network of changed size from scratch."""
    if arch.init == "scratch":
        return build_student(base_network(flow_model), arch)
    if arch.changes and isinstance(flow_model, VPAsFlow):
        raise ConfigError("distill.student.changes: a student that starts from a VP teacher's weights keeps its "
                          "architecture; set distill.student.init: scratch for a smaller student")
    return build_student(flow_model, arch)


class FlowPairsDistiller(Distiller):
    """A flow student trained on reflow pairs; sampled with flow Euler, exported with a flow-matching scheduler."""

    config_class = FlowPairsConfig
    family = "rectified_flow"
    needs_images = False
    sampler_name = "euler"

    def __init__(self, teacher, config):
        super().__init__(teacher, config)
        self.flow_teacher = as_flow_teacher(teacher)
        student = flow_student(self.flow_teacher.model, config.student)
        self.student_denoiser = self.flow_teacher.with_model(student, "flow", self.flow_teacher.schedule)

    @classmethod
    def stages(cls, cfg):
        if cfg.data.dataset != "pairs":
            raise ConfigError(f"method {cfg.method!r} trains on reflow pairs, not data.dataset = "
                              f"{cfg.data.dataset!r}: {PAIRS_HINT}")
        return [cfg]

    def pairs(self, batch):
        """(noise, sample, model conditions) of a pairs batch."""
        if "noise" not in batch or "sample" not in batch:
            raise StepdistillError(f"method {self.name!r} trains on reflow pairs: {PAIRS_HINT}")
        _, cond = self.teacher_info.encode_batch(batch, self.device)
        return batch["noise"].to(self.device).float(), batch["sample"].to(self.device).float(), cond

    def distance(self, name: str) -> Distance:
        decode = self.codec.differentiable_decode if self.codec.latent else None
        return Distance(name, huber_c=self.config.huber_c, decode=decode)

    def one_step(self, denoiser, noise, cond):
        """One Euler step from t = 1 to 0: x_hat = z - v(z, 1)."""
        return denoiser.x0(noise, torch.ones(noise.shape[0], device=noise.device), cond)

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale: float | None = None):
        """Flow Euler on FlowMatchEulerDiscreteScheduler's `steps`-step grid, as the exported pipeline samples."""
        den = self.student_denoiser
        if networks is not None:
            den = self.student_denoiser.with_model(networks["student"], "flow", den.schedule)
        grid = den.schedule.sampling_grid(steps)
        return sample_ode(den, noise, grid, {"cond": cond or {}, "guidance": guidance_scale}, solver="euler")

    def export_scheduler(self, steps):
        cfg = self.teacher_info.pipeline.scheduler.config
        if self.flow_teacher is self.teacher:  # a flow-matching teacher: its own scheduler settings (shift)
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        # a VP teacher's pipeline class (StableDiffusionPipeline) reads init_noise_sigma and scale_model_input
        cls = (FlowMatchEulerDiscreteScheduler if isinstance(self.teacher_info.pipeline, ClassConditionalPipeline)
               else VPPipelineFlowMatchScheduler)
        return cls(num_train_timesteps=self.flow_teacher.schedule.num_train_timesteps, shift=1.0)

    def model_card(self):
        return {"prediction_type": "flow", "converted_from_vp": self.flow_teacher is not self.teacher,
                "sampling": "Euler on FlowMatchEulerDiscreteScheduler's grid (t = 1 noise)"}


# ----------------------------------------------------------------------------- reflow


@dataclass
class ReflowConfig(FlowPairsConfig):
    timesteps: Literal["uniform", "logit_normal", "u_shaped"] = option(
        "u_shaped", "training-time distribution: uniform (RF paper), logit_normal (SD3), u_shaped (RF++, best)")
    u_shaped_a: float = option(4.0, "a of the U-shaped distribution p(t) ~ cosh(a (t - 1/2)) (RF++: 4)")
    logit_mean: float = option(0.0, "mean of the logit-normal distribution")
    logit_std: float = option(1.0, "standard deviation of the logit-normal distribution")
    loss: Literal["l2", "huber", "huber_ict", "lpips_huber"] = option(
        "lpips_huber", "l2 (RF paper); huber: elementwise pseudo-Huber (c = huber_c); huber_ict: pseudo-Huber of the "
                       "whole example, c = 0.00054 sqrt(d); lpips_huber: RF++'s (1 - t) huber_ict(v) + LPIPS(x_hat)")

    def __post_init__(self):
        super().__post_init__()
        check_range("distill.u_shaped_a", self.u_shaped_a, 0, low_open=True)
        check_range("distill.logit_std", self.logit_std, 0, low_open=True)


@register("reflow")
class ReflowDistiller(FlowPairsDistiller):
    """k-rectified flow: straighten the teacher's coupling by regressing velocities on straight paths."""

    config_class = ReflowConfig
    paper = {"title": "Improving the Training of Rectified Flows", "arxiv": "2405.20320"}
    quickstart_config = "reflow.yaml"

    def __init__(self, teacher, config: ReflowConfig):
        super().__init__(teacher, config)
        if config.loss == "lpips_huber":
            self.huber, self.lpips = self.distance("huber_ict"), self.distance("lpips")
        else:
            self.velocity_distance = self.distance(config.loss)

    def draw(self, n: int, device) -> torch.Tensor:
        c = self.config
        return draw_times(c.timesteps, n, device, c.u_shaped_a, c.logit_mean, c.logit_std)

    def velocity_loss(self, noise, sample, cond, t) -> torch.Tensor:
        """Per-example distance between the student's velocity on the straight path and z - x."""
        x_t = interpolate(noise, sample, t)
        v = self.student_denoiser.raw(x_t, t, cond)
        target = noise - sample
        if self.config.loss != "lpips_huber":
            return self.velocity_distance(v, target)
        x_hat = x_t - _bcast(t, x_t) * v
        return (1 - t) * self.huber(v, target) + self.lpips(x_hat, sample)

    def pairs_for_step(self, noise, sample, step):
        return noise, sample

    def loss(self, batch, step, network):
        noise, sample, cond = self.pairs(batch)
        noise, sample = self.pairs_for_step(noise, sample, step)
        t = self.draw(noise.shape[0], noise.device)
        return {"loss": self.velocity_loss(noise, sample, cond, t).mean()}

    def model_card(self):
        return {**super().model_card(), "timesteps": self.config.timesteps, "loss": self.config.loss}


# ----------------------------------------------------------------------------- InstaFlow


@dataclass
class InstaFlowConfig(FlowPairsConfig):
    loss: Literal["lpips", "huber_ict", "huber", "l2", "lpips_huber"] = option(
        "lpips", "distance between the one-step sample and the pair's (InstaFlow: LPIPS; huber_ict: pseudo-Huber)")


@register("instaflow")
class InstaFlowDistiller(FlowPairsDistiller):
    """One-step distillation of a (reflowed) flow: its single Euler step from t = 1 regressed onto the pair."""

    config_class = InstaFlowConfig
    paper = {"title": "InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation",
             "arxiv": "2309.06380"}
    quickstart_config = "instaflow.yaml"

    def __init__(self, teacher, config: InstaFlowConfig):
        super().__init__(teacher, config)
        self.one_step_distance = self.distance(config.loss)

    def loss(self, batch, step, network):
        noise, sample, cond = self.pairs(batch)
        return {"loss": self.one_step_distance(self.one_step(self.student_denoiser, noise, cond), sample).mean()}

    def model_card(self):
        return {**super().model_card(), "loss": self.config.loss, "steps_trained": 1}


# ----------------------------------------------------------------------------- SlimFlow


@dataclass
class SlimFlowConfig(ReflowConfig):
    phase: Literal["annealing_reflow", "guided_distillation"] = option(
        "annealing_reflow", "annealing_reflow: a (smaller) student learns the teacher's coupling, the noise annealed "
                            "from random pairing; guided_distillation: one-step distillation of that model (the "
                            "teacher of this run) with the pair loss plus the flow-guided loss")
    anneal_steps: int = option(300000, "W: optimizer steps over which the pairing anneals (SlimFlow: 300k of 1M)")
    hflip: bool = option(False, "flip each pair's noise and sample horizontally together with p = 0.5 (SlimFlow "
                                "on CIFAR-10; off for digits, whose classes flipping would change)")
    distill_loss: Literal["lpips", "huber_ict", "huber", "l2", "lpips_huber"] = option(
        "lpips", "distance of both guided-distillation losses (SlimFlow: LPIPS)")
    guide_t_min: float = option(0.2, "the two-step path's middle time, drawn from [min, max] (SlimFlow: 0.2)")
    guide_t_max: float = option(0.8, "upper end (SlimFlow: 0.8)")
    guide_weight: float = option(1.0, "weight of the flow-guided loss next to the pair loss (SlimFlow: 1)")

    def __post_init__(self):
        super().__post_init__()
        check_range("distill.anneal_steps", self.anneal_steps, 0)
        check_range("distill.guide_t_min", self.guide_t_min, 0, 1)
        check_range("distill.guide_t_max", self.guide_t_max, self.guide_t_min, 1)
        check_range("distill.guide_weight", self.guide_weight, 0)


@register("slimflow")
class SlimFlowDistiller(ReflowDistiller):
    """SlimFlow: annealing reflow of a small student, then flow-guided one-step distillation."""

    config_class = SlimFlowConfig
    paper = {"title": "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow",
             "arxiv": "2407.12718"}
    quickstart_config = "slimflow.yaml"

    def __init__(self, teacher, config: SlimFlowConfig):
        super().__init__(teacher, config)
        if config.phase == "guided_distillation":
            self.one_step_distance = self.distance(config.distill_loss)

    def pairs_for_step(self, noise, sample, step):
        if self.config.hflip:
            flip = _bcast(torch.rand(noise.shape[0], device=noise.device) < 0.5, noise)
            noise, sample = torch.where(flip, noise.flip(-1), noise), torch.where(flip, sample.flip(-1), sample)
        beta = anneal_beta(step, self.config.anneal_steps)
        return (annealed_noise(noise, torch.randn_like(noise), beta) if beta > 0 else noise), sample

    @torch.no_grad()
    def guide_target(self, z, x_hat, cond):
        """The flow-guided target: the student's own step from z to t (toward x_hat), then the teacher's Euler
        step from t to 0 (SlimFlow's x1 = x_t + (1 - t) v_T(x_t, t) in its time, t = 0 noise)."""
        c = self.config
        n = z.shape[0]
        t = 1 - (c.guide_t_min + (c.guide_t_max - c.guide_t_min) * torch.rand(n, device=z.device))  # flow time
        x_t = interpolate(z, x_hat, t)
        return self.flow_teacher.x0(x_t, t, cond)

    def loss(self, batch, step, network):
        if self.config.phase == "annealing_reflow":
            return super().loss(batch, step, network)
        noise, sample, cond = self.pairs(batch)
        pair = self.one_step_distance(self.one_step(self.student_denoiser, noise, cond), sample).mean()
        z = torch.randn_like(noise)
        x_hat = self.one_step(self.student_denoiser, z, cond)
        guide = self.one_step_distance(x_hat, self.guide_target(z, x_hat.detach(), cond)).mean()
        return {"loss": pair + self.config.guide_weight * guide, "pair": pair.detach(), "guide": guide.detach()}

    def model_card(self):
        return {**super().model_card(), "phase": self.config.phase}
