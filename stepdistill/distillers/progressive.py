"""Progressive distillation (Salimans & Ho 2022) and classifier-free guidance distillation (Meng et al. 2023).

Progressive distillation (arXiv 2202.00512, Algorithm 2). A student that samples in N DDIM steps
starts as a copy of its teacher (which samples in 2N). At a point t of the student's grid, with
t' the teacher's intermediate grid point and t'' the student's next one, the teacher takes two
DDIM steps z_t -> z_t' -> z_t'', and the student learns the x-prediction that makes its single
DDIM step t -> t'' land on z_t'':

    x_tilde = (z_t'' - (s_t''/s_t) z_t) / (a_t'' - (s_t''/s_t) a_t)
    loss    = w(t) ||x_hat_student(z_t) - x_tilde||^2,   w = max(SNR_t, 1)  or  SNR_t + 1

The student starts as a copy of the teacher's weights, so it keeps the teacher's head (eps, v, x or
the flow velocity): another head on the same weights would start far from the teacher (an SD1.5 eps
network read as v gives x0 = 0.07 x - eps_hat at t = 1 where the teacher gives 14.7 (x - eps_hat)).
An eps head cannot give x at SNR 0, so an eps teacher with zero terminal SNR is refused. One run trains one round; `stages` expands a config into
rounds N0/2, N0/4, ..., each its own run in its own folder (own checkpoints, own export), whose
exported student is the next round's teacher.

Guidance distillation (arXiv 2210.03142, stage one). A student with a guidance-scale input
(LCM-style embedding fed as `timestep_cond`, zero-initialised) learns the teacher's classifier-free
guided x-prediction for scales w drawn from a range, so that one forward pass replaces two:

    loss = w(t) ||x_hat_student(z_t, w) - (x_u + w (x_c - x_u))||^2

(scales in diffusers' convention, w = 1 is no guidance; the paper's w is ours minus one). Stage two
is progressive distillation of that student, with the same w given to teacher and student.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from .. import solvers
from ..config import check_range, option
from ..errors import ConfigError
from ..export import grid_scheduler, sampler_clip
from ..guidance import check_guidance_range, draw_scales, guidance_input, require_null_condition
from ..samplers import sample_ode
from ..schedules import FlowSchedule, NoiseSchedule, VPSchedule, sample_training_times
from .base import Distiller, DistillerConfig, register
from .common import copy_student



# ----------------------------------------------------------------------------- the math


def loss_weight(a: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    """w(t) on the x-space error (Salimans & Ho, Sec. 4): max(SNR, 1) ('truncated SNR') or SNR + 1 (= v-MSE)."""
    snr = (a / s) ** 2
    return snr.clamp(min=1.0) if kind == "truncated_snr" else snr + 1.0


def ddim_target(z_t, z_next, a_t, s_t, a_next, s_next) -> torch.Tensor:
    """The x that makes one DDIM step z_t -> t'' land on z_next (Salimans & Ho, Algorithm 2)."""
    r = s_next / s_t
    return (z_next - r * z_t) / (a_next - r * a_t)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over the batch of weight * (per-example mean squared error)."""
    per_example = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return (weight.reshape(-1) * per_example).mean()


def student_grid(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The student's descending times t_0 = top > ... > t_steps = 0: the trailing DDIM grid ending at the clean end,
    or a flow teacher's shift(k / steps) (FlowSchedule.sampling_grid 'shifted'); both nest across rounds."""
    if isinstance(schedule, FlowSchedule):
        return schedule.sampling_grid(steps, "shifted")
    grid = schedule.sampling_grid(steps, "trailing").double()
    grid[-1] = 0.0
    return grid.float()


def step_grids(schedule: NoiseSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, mid): the student's grid and the teacher's intermediate point inside each of its steps.

    The grid for N steps is every other point of the one for 2N, so mid is exactly the previous round's
    own grid: the teacher (the previous round's student) is only queried where it was trained."""
    grid = student_grid(schedule, steps)
    fine = student_grid(schedule, 2 * steps)
    if not torch.allclose(fine[::2], grid, atol=1e-7, rtol=0):
        raise ConfigError(f"the {steps}-step student grid is not every other point of the {2 * steps}-step grid "
                          "its teacher sampled on")
    return grid, fine[1::2]


def student_prediction(teacher, wanted: str) -> str:
    """The student head: the teacher's own (auto), so that the copied weights start as the teacher does.

    Another head is refused, and so is eps at zero SNR (x0 = (x - s eps) / a is undefined at a = 0)."""
    own = teacher.prediction_type
    kind = own if wanted == "auto" else wanted
    if kind != own:
        raise ConfigError(f"distill.prediction_type = {kind!r} differs from the teacher's {own!r}: the student starts "
                          f"as a copy of the teacher's weights, and those read as {kind!r} start far from the teacher; "
                          f"use auto (keeps {own!r})")
    if kind == "epsilon" and teacher.schedule.alpha_sigma(torch.ones(1))[0].item() < 1e-6:
        raise ConfigError("an eps-prediction teacher with zero terminal SNR cannot give x0 at t = 1, where every "
                          "student grid starts; distil a v-prediction teacher instead")
    return kind


def check_teacher_steps(key: str, steps: int, schedule: NoiseSchedule) -> None:
    """A VP teacher's trailing grid has distinct timesteps only up to T steps (beyond, some steps have length 0)."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule) and steps > T:
        raise ConfigError(f"{key}: a {steps}-step teacher grid exceeds the teacher's {T} training timesteps (its "
                          f"trailing grid would repeat timesteps: zero-length steps); use at most {T}, a power-of-two "
                          f"multiple of the end steps such as {1 << (T.bit_length() - 1)}")


def sample_grid_ddim(distiller, noise, cond, steps, networks, guidance_scale):
    """Deterministic DDIM on the student's `steps`-point grid, as its exported scheduler samples it (x0 clipped
    where that clips), with w as the student takes it: embedded, or classifier-free guidance when given."""
    den = distiller.student_denoiser
    if networks is not None:
        den = distiller.teacher.with_model(networks["student"], den.prediction_type)
    if distiller.guided.dim is None:
        extra = {"cond": cond or {}, "guidance": guidance_scale}
    else:
        n = noise.shape[0]
        w = torch.full((n,), guidance_scale if guidance_scale is not None else distiller.default_guidance())
        extra = {"cond": distiller.guided.condition(cond or {}, w, n, noise.device)}
    return sample_ode(den, noise, student_grid(distiller.teacher.schedule, steps), extra,
                      clip_x0=sampler_clip(distiller.export_scheduler(steps)))


# ----------------------------------------------------------------------------- progressive distillation


@dataclass
class ProgressiveConfig(DistillerConfig):
    start_steps: int = option(512, "teacher's DDIM steps at round 1; round r's student samples in start_steps / 2^r; "
                                   "at most the teacher's T training timesteps for a VP teacher (512 for T = 1000; "
                                   "paper: 8192 CIFAR-10, 1024 ImageNet 64 / LSUN, in continuous time)")
    end_steps: int = option(1, "steps of the last round's student (paper: 1)")
    round: int = option(0, "the round this run trains (1: start_steps -> start_steps / 2); 0: every round, each its "
                           "own run in output_dir/round-RR-Nsteps whose exported student teaches the next")
    prediction_type: Literal["auto", "v_prediction", "sample", "flow"] = option(
        "auto", "student head: auto = the teacher's own (the student starts as a copy of its weights); another is "
                "refused (paper: teachers trained in x or v; eps is undefined at SNR 0)")
    weighting: Literal["truncated_snr", "snr_plus_one"] = option(
        "truncated_snr", "w(t) on the x error: max(SNR, 1) (paper's runs) or SNR + 1 (= MSE in v)")
    guidance_scale_min: float = option(1.0, "guidance scale (diffusers convention, 1 = none) drawn per example from "
                                            "[min, max]: the teacher's CFG, or the w input of a guidance-distilled teacher "
                                            "and student (stage two of guidance distillation)")
    guidance_scale_max: float = option(1.0, "upper end of the guidance-scale range")
    eval_guidance_scales: list[float] = option([], "guidance scales a guidance-embedded student is evaluated at "
                                                   "(empty: guidance_scale_min)")

    def __post_init__(self):
        check_range("distill.end_steps", self.end_steps, 1)
        check_range("distill.start_steps", self.start_steps, 2 * self.end_steps)
        ratio = self.start_steps // self.end_steps
        if self.start_steps % self.end_steps or ratio & (ratio - 1):
            raise ConfigError(f"distill.start_steps / distill.end_steps = {self.start_steps} / {self.end_steps} must be "
                              "a power of two (each round halves the steps)")
        check_range("distill.round", self.round, 0, self.num_rounds)
        check_guidance_range("distill", self.guidance_scale_min, self.guidance_scale_max)

    @property
    def num_rounds(self) -> int:
        return int(math.log2(self.start_steps // self.end_steps))

    def student_steps(self, round_: int) -> int:
        return self.start_steps >> round_


@register("progressive")
class ProgressiveDistiller(Distiller):
    """One round of progressive distillation: a student in N DDIM steps matches its teacher's 2N."""

    config_class = ProgressiveConfig
    paper = {"title": "Progressive Distillation for Fast Sampling of Diffusion Models", "arxiv": "2202.00512"}
    family = "progressive"
    quickstart_config = "progressive.yaml"
    supports_flow_teacher = True  # flow Euler grids and the velocity head
    sampler_name = "ddim"

    def __init__(self, teacher, config: ProgressiveConfig):
        super().__init__(teacher, config)
        if config.round == 0:
            raise ConfigError("distill.round = 0 stands for all rounds, which are separate runs: start them with "
                              "`stepdistill train` (or runner.run_stages), or set distill.round to one round")
        schedule = self.teacher.schedule
        kind = student_prediction(self.teacher, config.prediction_type)
        self.student_denoiser = self.teacher.with_model(copy_student(self.teacher.model), kind)
        self.guided = guidance_input(self.teacher.model)  # the student inherits the teacher's inputs
        if self.guided.dim is None and config.guidance_scale_min != config.guidance_scale_max:
            raise ConfigError("a range of guidance scales needs a student that takes the scale as input: distil the "
                              "teacher with method 'guidance' first (stage one), or set guidance_scale_max = _min")
        if self.guided.dim is None:
            require_null_condition(self.teacher, config.guidance_scale_min, config.guidance_scale_max)
        self.steps = config.student_steps(config.round)
        check_teacher_steps("distill.start_steps", config.student_steps(config.round - 1), schedule)
        self.grid, self.mid = step_grids(schedule, self.steps)

    def draw_guidance(self, n: int, device) -> torch.Tensor | None:
        return draw_scales(self.config.guidance_scale_min, self.config.guidance_scale_max, n, device)

    @torch.no_grad()
    def teacher_two_steps(self, z_t, t, t_mid, t_next, cond, w):
        """Two deterministic DDIM steps of the teacher, t -> t' -> t'' (no x clipping, as the paper's code)."""
        den = self.teacher
        z_mid = solvers.ddim_step(den, z_t, t, t_mid, pred=self.guided.predict(den, z_t, t, cond, w))
        return solvers.ddim_step(den, z_mid, t_mid, t_next, pred=self.guided.predict(den, z_mid, t_mid, cond, w))

    def loss(self, batch, step, network):
        x0, cond = self.teacher_info.encode_batch(batch, self.device)
        n = x0.shape[0]
        i = torch.randint(0, self.steps, (n,), device=x0.device)
        grid, mid = self.grid.to(x0.device), self.mid.to(x0.device)
        t, t_mid, t_next = grid[i], mid[i], grid[i + 1]
        z_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        w = self.draw_guidance(n, x0.device)
        z_next = self.teacher_two_steps(z_t, t, t_mid, t_next, cond, w)
        a, s = self.teacher.alpha_sigma(t, x0)
        a_next, s_next = self.teacher.alpha_sigma(t_next, x0)
        x_tilde = ddim_target(z_t, z_next, a, s, a_next, s_next)
        x_hat = self.student_denoiser.x0(z_t, t, self.guided.condition(cond, w, n, x0.device))
        return {"loss": weighted_mse(x_hat, x_tilde, loss_weight(a, s, self.config.weighting))}

    # -- sampling and export -------------------------------------------------------------------
    def default_guidance(self) -> float:
        return self.config.guidance_scale_min

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale: float | None = None):
        """Deterministic DDIM on the student's own `steps`-point grid (the round's N, or any other), as exported."""
        return sample_grid_ddim(self, noise, cond, steps, networks, guidance_scale)

    def export_scheduler(self, steps):
        return grid_scheduler(self.teacher_info, self.student_denoiser.prediction_type, steps)

    def eval_guidance_scales(self):
        if self.guided.dim is None:
            return [None]
        return list(self.config.eval_guidance_scales) or [self.default_guidance()]

    def model_card(self):
        card = {"round": self.config.round, "student_steps": self.steps, "teacher_steps": 2 * self.steps,
                "prediction_type": self.student_denoiser.prediction_type, "weighting": self.config.weighting,
                "sampling": f"deterministic DDIM on the {self.steps}-step student grid"}
        if self.guided.dim is not None:
            card["guidance"] = "embedded: pass guidance_scale; one network pass per step"
        return card

    @classmethod
    def stages(cls, cfg):
        """Round r (1..R) as its own run: output_dir/round-RR-Nsteps, taught by round r-1's exported student."""
        if cfg.distill.round:
            return [cfg]
        runs, teacher = [], cfg.teacher
        for r in range(1, cfg.distill.num_rounds + 1):
            steps = cfg.distill.student_steps(r)
            stage = copy.deepcopy(cfg)
            stage.distill = replace(cfg.distill, round=r)
            stage.teacher = teacher
            stage.output_dir = str(Path(cfg.output_dir) / f"round-{r:02d}-{steps}steps")
            stage.export.steps = [steps]
            runs.append(stage)
            teacher = str(Path(stage.output_dir) / "student")
        return runs


# ----------------------------------------------------------------------------- guidance distillation


@dataclass
class GuidanceConfig(DistillerConfig):
    guidance_scale_min: float = option(1.0, "lower end of the guidance scales w the student learns (diffusers "
                                            "convention, 1 = none; paper: w_paper = 0, i.e. 1 here)")
    guidance_scale_max: float = option(5.0, "upper end (paper: w_paper = 4 on ImageNet 64 / CIFAR-10, i.e. 5 here)")
    guidance_embedding_dim: int = option(256, "size of the student's w input (time_cond_proj_dim; LCM: 256)")
    prediction_type: Literal["auto", "v_prediction", "sample", "flow"] = option(
        "auto", "student head: auto = the teacher's own (a copy of its weights), kept through stage two")
    weighting: Literal["truncated_snr", "snr_plus_one"] = option("truncated_snr", "w(t) on the x error")
    eval_guidance_scales: list[float] = option([1.0, 2.0, 4.0], "guidance scales the student is evaluated at")
    progressive_start_steps: int = option(0, "stage two: progressive distillation of the guided student starting "
                                             "from its DDIM at this many steps (0: stage one only)")
    progressive_end_steps: int = option(1, "stage two: steps of the last round's student")
    progressive_max_steps: int = option(0, "stage two: optimizer steps per round (0: train.max_steps)")
    progressive_learning_rate: float = option(0.0, "stage two: learning rate (0: train.learning_rate)")

    def __post_init__(self):
        check_guidance_range("distill", self.guidance_scale_min, self.guidance_scale_max)
        check_range("distill.guidance_embedding_dim", self.guidance_embedding_dim, 2)
        check_range("distill.progressive_start_steps", self.progressive_start_steps, 0)
        check_range("distill.progressive_max_steps", self.progressive_max_steps, 0)
        check_range("distill.progressive_learning_rate", self.progressive_learning_rate, 0)
        if self.progressive_start_steps:
            self.stage_two(1)  # validates the round structure now

    def stage_two(self, round_: int = 0) -> ProgressiveConfig:
        return ProgressiveConfig(start_steps=self.progressive_start_steps, end_steps=self.progressive_end_steps,
                                 round=round_, prediction_type=self.prediction_type, weighting=self.weighting,
                                 guidance_scale_min=self.guidance_scale_min, guidance_scale_max=self.guidance_scale_max,
                                 eval_guidance_scales=list(self.eval_guidance_scales))


@register("guidance")
class GuidanceDistiller(Distiller):
    """Stage one of guidance distillation: one w-conditioned pass matches the teacher's two-pass CFG."""

    config_class = GuidanceConfig
    paper = {"title": "On Distillation of Guided Diffusion Models", "arxiv": "2210.03142"}
    family = "progressive"
    quickstart_config = "guidance.yaml"
    flow_teacher_reason = ("not yet run on a flow teacher: its stage two is progressive rounds, whose flow grids "
                           "issue 12 item 3 is making nest")
    sampler_name = "ddim"

    def __init__(self, teacher, config: GuidanceConfig):
        super().__init__(teacher, config)
        if self.teacher.null_cond is None:
            raise ConfigError("guidance distillation needs a conditional teacher with a null condition "
                              "(classifier-free guidance); this teacher has none")
        kind = student_prediction(self.teacher, config.prediction_type)
        if config.progressive_start_steps:  # stage two's first teacher grid, checked before stage one trains
            check_teacher_steps("distill.progressive_start_steps", config.progressive_start_steps, self.teacher.schedule)
        student = copy_student(self.teacher.model, time_cond_proj_dim=config.guidance_embedding_dim)
        self.student_denoiser = self.teacher.with_model(student, kind)
        self.guided = guidance_input(student)

    def loss(self, batch, step, network):
        x0, cond = self.teacher_info.encode_batch(batch, self.device)
        n = x0.shape[0]
        t = sample_training_times(self.teacher.schedule, n, x0.device)
        z_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        lo, hi = self.config.guidance_scale_min, self.config.guidance_scale_max
        w = lo + (hi - lo) * torch.rand(n, device=x0.device)  # drawn even when lo = hi = 1: the student sees w
        with torch.no_grad():
            target = self.teacher.x0(z_t, t, cond, guidance=w)
        x_hat = self.student_denoiser.x0(z_t, t, self.guided.condition(cond, w, n, x0.device))
        a, s = self.teacher.alpha_sigma(t, x0)
        return {"loss": weighted_mse(x_hat, target, loss_weight(a, s, self.config.weighting))}

    def default_guidance(self) -> float:
        return self.config.guidance_scale_min

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale: float | None = None):
        """Deterministic DDIM (trailing grid) with w embedded, as exported: one network pass per step."""
        return sample_grid_ddim(self, noise, cond, steps, networks, guidance_scale)

    def export_scheduler(self, steps):
        return grid_scheduler(self.teacher_info, self.student_denoiser.prediction_type, steps)

    def eval_guidance_scales(self):
        return list(self.config.eval_guidance_scales)

    def model_card(self):
        return {"prediction_type": self.student_denoiser.prediction_type,
                "guidance": f"embedded w in [{self.config.guidance_scale_min}, {self.config.guidance_scale_max}]: "
                            "pass guidance_scale; one network pass per step"}

    @classmethod
    def stages(cls, cfg):
        """Stage one in output_dir/guided; with progressive_start_steps, stage two's rounds in output_dir/progressive."""
        d = cfg.distill
        if not d.progressive_start_steps:
            return [cfg]
        one = copy.deepcopy(cfg)
        one.distill = replace(d, progressive_start_steps=0)
        one.output_dir = str(Path(cfg.output_dir) / "guided")
        two = copy.deepcopy(cfg)
        two.method = ProgressiveDistiller.name
        two.distill = d.stage_two()
        two.teacher = str(Path(one.output_dir) / "student")
        two.output_dir = str(Path(cfg.output_dir) / "progressive")
        if d.progressive_max_steps:
            two.train.max_steps = d.progressive_max_steps
        if d.progressive_learning_rate:
            two.train.learning_rate = d.progressive_learning_rate
        return [one, *ProgressiveDistiller.stages(two)]
