"""The consistency family: CD and LCM, TCD, and multi-phase consistency (PCM / Hyper-SD TSCD).

All four share one training step (Song et al. 2023, Algorithm 2, in the latent-consistency form of
Luo et al. 2023): draw a point t_n of an N-point skipping grid over the teacher's timesteps (for
T = 1000 and N = 50, timesteps 19, 39, ..., 999; t_n = n / N), noise the data to x_{t_n}, take one
teacher ODE step with classifier-free guidance w to x_{t_{n-1}}, and pull the student's map at
(x_{t_n}, t_n) towards the target network's map at (x_{t_{n-1}}, t_{n-1}) under stop-gradient:

    loss = d( f_theta(x_{t_n}, t_n -> s),  sg f_target(Phi_teacher^w(x_{t_n}; t_n -> t_{n-1}), t_{n-1} -> s) )

The methods differ only in where the map lands (s) and how it is written:

- `cd` / `lcm`: s = 0, f = c_skip(t) x + c_out(t) x0_theta (LCM's boundary scalings, which LCMScheduler
  applies at sampling). `lcm` adds LCM's defaults: w drawn per example and fed to the student as the
  w-embedding (diffusers' `timestep_cond`), or baked in (LCM-LoRA).
- `tcd` (Zheng et al. 2024): s drawn on the grid at or below t_{n-1}, f = the DDIM jump
  a_s x0_theta + s_s eps_theta (the semi-linear form; f(x, t -> t) = x), sampled by TCD's strategic
  stochastic sampling with gamma, exported with TCDScheduler.
- `pcm` (Wang et al. 2024): the ODE is cut into K phases whose edges are the K-step sampling grid of the
  exported scheduler; s = the lower edge of t_n's phase and the teacher step stops at that edge. A stage
  plan (Hyper-SD, Ren et al. 2024) lowers K over training, e.g. 8 -> 4 -> 2 -> 1.

Guidance convention: everywhere the diffusers scale w (uncond + w (cond - uncond), w = 1 is none). LCM's
own w is this minus one; the w-embedding takes w - 1, as LatentConsistencyModelPipeline feeds it.
Variance-preserving and flow-matching teachers differ only in a Timeline (the skipping grid, the boundary
scalings, the sampling times and the diffusers scheduler), chosen once from the teacher's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import LCMScheduler, TCDScheduler

from .. import solvers
from ..config import check_range, option
from ..denoiser import Prediction
from ..errors import ConfigError
from ..export import grid_scheduler
from ..guidance import check_guidance_range, draw_scales, guidance_input, require_null_condition
from ..losses import Distance
from ..lora import add_lora
from ..pipelines import FlowGridScheduler
from ..samplers import sample_consistency, sample_ode, sample_tcd
from ..schedules import FlowSchedule, VPSchedule, _bcast
from .base import Distiller, DistillerConfig, register
from .common import copy_student


BOUNDARY_DEFAULTS = {"timestep_scaling": 10.0, "sigma_data": 0.5}  # LCM's


@dataclass
class ConsistencyConfig(DistillerConfig):
    num_ddim_timesteps: int = option(50, "N: points of the teacher grid; the skipping interval is T / N timesteps (LCM: 50)")
    solver: Literal["ddim", "euler", "heun"] = option("ddim", "teacher ODE step across one skipping interval")
    target: Literal["ema", "online"] = option("ema", "target network: EMA of the student, or the student under stop-gradient")
    target_ema_decay: float = option(0.95, "EMA rate of the target network (LCM and CD: 0.95)")
    loss: Literal["huber", "l2", "huber_ict", "lpips"] = option(
        "huber", "distance d: elementwise pseudo-Huber sqrt(diff^2 + c^2) - c (LCM), squared L2, iCT's pseudo-Huber "
        "on the whole example (c = 0.00054 sqrt(dim)), or LPIPS (AlexNet from $STEPDISTILL_ASSETS; latents are "
        "decoded through the VAE first)")
    huber_c: float = option(0.001, "pseudo-Huber c (LCM: 0.001)")
    timestep_scaling: float | None = option(None, "boundary scalings use timestep * scaling (LCMScheduler's "
                                                  "timestep_scaling; default 10); only cd / lcm on a VP teacher read it")
    sigma_data: float | None = option(None, "boundary scalings' sigma_data (default 0.5); only cd / lcm on a VP teacher "
                                            "read it; LCMScheduler fixes 0.5, so the export folds another value into "
                                            "its timestep_scaling (the scalings depend on scaling / sigma_data only)")
    guidance_scale_min: float = option(1.0, "teacher CFG scale (diffusers convention, 1 = none) drawn per example from [min, max]")
    guidance_scale_max: float = option(1.0, "upper end of the teacher CFG range (LCM: w in [5, 15] in its own convention = 6..16 here)")
    guidance_embedding: bool = option(False, "feed the CFG scale to the student as LCM's w-embedding (timestep_cond)")
    guidance_embedding_dim: int = option(256, "size of the w-embedding (time_cond_proj_dim)")
    sample_guidance_scale: float | None = option(None, "scale the student's own sampler embeds (w-embedding students); "
                                                       "default: guidance_scale_min")
    lora_rank: int = option(0, "train a LoRA of this rank through peft instead of the whole network (0: full fine-tuning; LCM-LoRA: 64)")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, i.e. scale 1; LCM-LoRA: 64)")
    lora_target_modules: list[str] = option([], "layers that get adapters (default: LCM-LoRA's UNet list; "
                                                "transformers: e.g. [to_q, to_k, to_v, to_out.0])")
    data_free_steps: int = option(4, "prompt-only batches: x_{t_n} = teacher DDIM with guidance from pure noise at t = 1, "
                                     "in this many steps")

    def __post_init__(self):
        check_range("distill.num_ddim_timesteps", self.num_ddim_timesteps, 2, 1000)
        for key in BOUNDARY_DEFAULTS:
            if getattr(self, key) is not None:
                check_range(f"distill.{key}", getattr(self, key), 0, low_open=True)
        check_range("distill.target_ema_decay", self.target_ema_decay, 0, 1)
        check_range("distill.huber_c", self.huber_c, 0, low_open=True)
        check_guidance_range("distill", self.guidance_scale_min, self.guidance_scale_max)
        check_range("distill.guidance_embedding_dim", self.guidance_embedding_dim, 2)
        check_range("distill.lora_rank", self.lora_rank, 0)
        check_range("distill.data_free_steps", self.data_free_steps, 1, 1000)
        if self.lora_alpha is not None:
            check_range("distill.lora_alpha", self.lora_alpha, 0, low_open=True)
        if self.guidance_embedding and self.lora_rank:
            raise ConfigError("distill.guidance_embedding needs a new input layer that a LoRA (distill.lora_rank > 0) "
                              "cannot train; LCM-LoRA bakes guidance in: set guidance_embedding: false")

    def boundary_value(self, key: str) -> float:
        """timestep_scaling / sigma_data as set, else LCM's value."""
        value = getattr(self, key)
        return BOUNDARY_DEFAULTS[key] if value is None else value

    def refuse_boundary_settings(self, why: str) -> None:
        """timestep_scaling and sigma_data are read by LCM's boundary scalings alone; elsewhere setting them is an error."""
        for key in BOUNDARY_DEFAULTS:
            if getattr(self, key) is not None:
                raise ConfigError(f"distill.{key} is not read by {why}; remove it")


@dataclass
class LCMConfig(ConsistencyConfig):
    """Latent consistency distillation (Luo et al. 2023); values from diffusers' train_lcm_distill_sd_wds.py."""

    loss: Literal["huber", "l2", "huber_ict", "lpips"] = option("huber", "distance d (LCM README commands: huber)")
    guidance_scale_min: float = option(6.0, "lowest teacher CFG scale, diffusers convention (LCM: w_min = 5, its own convention)")
    guidance_scale_max: float = option(16.0, "highest teacher CFG scale, diffusers convention (LCM: w_max = 15)")
    guidance_embedding: bool = option(True, "LCM's w-conditioning (timestep_cond); off for LCM-LoRA")


@dataclass
class TCDConfig(ConsistencyConfig):
    """Trajectory consistency distillation (Zheng et al. 2024, arXiv 2402.19159)."""

    loss: Literal["huber", "l2", "huber_ict", "lpips"] = option("huber", "distance d")
    gamma: float = option(0.3, "strategic stochastic sampling's gamma (TCDScheduler's eta, default 0.3): "
                               "0 = deterministic DDIM-like, 1 = LCM-like multistep")
    guidance_scale_min: float = option(6.0, "lowest teacher CFG scale, diffusers convention (as LCM)")
    guidance_scale_max: float = option(16.0, "highest teacher CFG scale, diffusers convention (as LCM)")

    def __post_init__(self):
        super().__post_init__()
        check_range("distill.gamma", self.gamma, 0, 1)
        self.refuse_boundary_settings("tcd: its map is the DDIM jump, which has no boundary scalings")


@dataclass
class PCMConfig(ConsistencyConfig):
    """Phased consistency (Wang et al. 2024, arXiv 2405.18407) with Hyper-SD's stage plan (arXiv 2404.13686)."""

    num_phases: int | None = option(None, "K: ODE segments, each with its own consistency target (default 4; PCM "
                                          "script: --multiphase 4); not with stage_phases")
    stage_phases: list[int] = option([], "Hyper-SD trajectory-segmented stages: K per stage, non-increasing, e.g. "
                                         "[8, 4, 2, 1] (empty: num_phases throughout)")
    stage_steps: int = option(0, "optimizer steps per stage; the last stage runs to the end (needed with two or more "
                                 "stage_phases, refused otherwise)")
    target: Literal["ema", "online"] = option("online", "target network (PCM: the online student under stop-gradient)")
    loss: Literal["huber", "l2", "huber_ict", "lpips"] = option("huber", "distance d (PCM: huber, c = 0.001)")
    guidance_scale_min: float = option(5.0, "lowest teacher CFG scale, diffusers convention (PCM: w_min = 4, LCM form)")
    guidance_scale_max: float = option(6.0, "highest teacher CFG scale, diffusers convention (PCM: w_max = 5, LCM form)")

    def __post_init__(self):
        super().__post_init__()
        self.refuse_boundary_settings("pcm: its map is the DDIM jump to the phase edge, which has no boundary scalings")
        if self.num_phases is not None and self.stage_phases:
            raise ConfigError("distill.num_phases and distill.stage_phases both set K; keep one (the stage plan's last "
                              "K is the final student's)")
        if self.num_phases is not None:
            check_range("distill.num_phases", self.num_phases, 1, self.num_ddim_timesteps)
        for k in self.stage_phases:
            check_range("distill.stage_phases[]", k, 1, self.num_ddim_timesteps)
        if any(b > a for a, b in zip(self.stage_phases, self.stage_phases[1:])):
            raise ConfigError(f"distill.stage_phases = {self.stage_phases} rises; each stage keeps or lowers K "
                              "(Hyper-SD: 8 -> 4 -> 2 -> 1)")
        if len(self.stage_phases) > 1 and self.stage_steps < 1:
            raise ConfigError("distill.stage_phases needs distill.stage_steps >= 1 (optimizer steps per stage)")
        if len(self.stage_phases) <= 1 and self.stage_steps:
            raise ConfigError("distill.stage_steps is read only with two or more distill.stage_phases; remove it")

    @property
    def phases(self) -> int:
        """K without a stage plan."""
        return 4 if self.num_phases is None else self.num_phases


def jump(denoiser, x, t, s, cond, pred=None):
    """The DDIM (first-order exponential-integrator) map x_t -> x_s from the network's (x0, eps) at t.

    jump(x, t, t) = x for every parameterization, and jump(x, t, 0) = x0."""
    p = pred if pred is not None else denoiser.predict(x, t, cond)
    a, sig = denoiser.alpha_sigma(s, x)
    return a * p.x0 + sig * p.eps


class ConsistencyFunction:
    """LCM's f(x, t) = c_skip(t) x + c_out(t) x0(x, t), as a denoiser whose x0 is f (the consistency sampler's model)."""

    def __init__(self, denoiser, boundary):
        self.denoiser, self.boundary = denoiser, boundary
        self.alpha_sigma, self.add_noise = denoiser.alpha_sigma, denoiser.add_noise

    def predict(self, x, t, cond=None):
        c_skip, c_out = self.boundary(t, x)
        return Prediction(c_skip * x + c_out * self.denoiser.x0(x, t, cond), None)


# ----------------------------------------------------------------------------- timelines


class VPTimeline:
    """Variance-preserving teachers: the skipping grid t_n = n / N over the T discrete timesteps,
    LCM's boundary scalings, and diffusers' LCMScheduler / TCDScheduler / DDIMScheduler ('trailing')."""

    def __init__(self, schedule: VPSchedule, config: ConsistencyConfig):
        self.schedule, self.config = schedule, config
        self.N = config.num_ddim_timesteps
        if schedule.num_train_timesteps % self.N:
            raise ConfigError(f"distill.num_ddim_timesteps = {self.N} must divide the teacher's "
                              f"{schedule.num_train_timesteps} training timesteps")

    def grid(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.float() / self.N

    def boundary(self, t: torch.Tensor):
        """LCM's c_skip, c_out at the network timestep (LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
        scaled = self.schedule.model_timestep(t) * self.config.boundary_value("timestep_scaling")
        sd2 = self.config.boundary_value("sigma_data") ** 2
        return sd2 / (scaled ** 2 + sd2), scaled / (scaled ** 2 + sd2).sqrt()

    def _picks(self, steps: int) -> torch.Tensor:
        """LCM/TCD: `steps` points of the N-point grid, evenly spaced in index from the top (descending t)."""
        if steps > self.N:
            raise ConfigError(f"{steps} sampling steps exceed the {self.N}-point consistency grid")
        idx = torch.arange(self.N, 0, -1)[torch.floor(torch.linspace(0, self.N, steps + 1)[:-1]).long()]
        return self.grid(idx)

    def consistency_times(self, steps):
        return self._picks(steps)

    def tcd_times(self, steps):
        """TCDScheduler's times, then its final landing point: timestep 0 (not the clean end)."""
        return torch.cat([self._picks(steps), self.schedule.t_of_timestep(torch.tensor([0])).float()])

    def tcd_s(self, t_next: torch.Tensor, gamma: float) -> torch.Tensor:
        """TCD's s = floor((1 - gamma) * prev_timestep), in the scheduler's integer timesteps."""
        k = torch.floor((1 - gamma) * self.schedule.model_timestep(t_next).double())
        return self.schedule.t_of_timestep(k).float()

    def phase_edges(self, k: int) -> torch.Tensor:
        """DDIM 'trailing' at k steps, ending at the clean end (999, 666, 332, 0 at K = 3)."""
        grid = self.schedule.sampling_grid(k, "trailing")
        return torch.cat([grid[:-1], torch.zeros(1)])

    def export_timestep_scaling(self) -> float:
        """LCMScheduler's timestep_scaling giving our scalings with its fixed sigma_data = 0.5: they depend on
        scaling / sigma_data alone (c_skip = 1 / ((t c / sd)^2 + 1), c_out = (t c / sd) / sqrt((t c / sd)^2 + 1))."""
        return self.config.boundary_value("timestep_scaling") * 0.5 / self.config.boundary_value("sigma_data")

    def scheduler(self, kind: str, teacher_info, prediction_type: str):
        base_config = teacher_info.pipeline.scheduler.config
        common = dict(clip_sample=False, prediction_type=prediction_type, set_alpha_to_one=True)
        if kind == "consistency":
            return LCMScheduler.from_config(base_config, original_inference_steps=self.N,
                                            timestep_scaling=self.export_timestep_scaling(), **common)
        if kind == "tcd":
            return TCDScheduler.from_config(base_config, original_inference_steps=self.N, **common)
        raise ConfigError(f"no VP scheduler of kind {kind!r}")  # phased: the distiller's grid scheduler


class FlowTimeline:
    """Flow-matching teachers (SD3): the grid t_n = shift(n / N); no boundary scalings, since the flow
    parameterization x0 = x - t u already gives f(x, 0) = x. Few-step sampling times and phase edges are
    shift(k / K) (PCM's SD3 edges: 1, 0.9, 0.75, 0.5, 0 at K = 4, shift 3), which FlowGridScheduler samples."""

    def __init__(self, schedule: FlowSchedule, config: ConsistencyConfig):
        self.schedule, self.config = schedule, config
        self.N = config.num_ddim_timesteps
        config.refuse_boundary_settings("a flow-matching teacher's consistency map: f(x, t) = x - t u meets the "
                                        "boundary condition without scalings")

    def grid(self, idx):
        return self.schedule.shifted(idx.double() / self.N).float()

    def boundary(self, t):
        t = torch.as_tensor(t).float()
        return torch.zeros_like(t), torch.ones_like(t)

    def few_step_grid(self, steps):
        return self.schedule.sampling_grid(steps, "shifted")

    def consistency_times(self, steps):
        return self.few_step_grid(steps)[:-1]

    def tcd_times(self, steps):
        return self.few_step_grid(steps)

    def tcd_s(self, t_next, gamma):
        return (1 - gamma) * t_next

    def phase_edges(self, k):
        return self.few_step_grid(k)

    def scheduler(self, kind: str, teacher_info, prediction_type: str):
        # consistency sampling = stochastic_sampling (x0, then fresh noise at the next sigma); TCD: gamma's
        # strategic stochastic step (gamma = 1 is consistency sampling, 0 the Euler step); PCM: the Euler step
        gamma = self.config.gamma if kind == "tcd" else 0.0
        return FlowGridScheduler.from_config(teacher_info.pipeline.scheduler.config,
                                             stochastic_sampling=kind == "consistency", gamma=gamma)


TIMELINES = {VPSchedule: VPTimeline, FlowSchedule: FlowTimeline}


# ----------------------------------------------------------------------------- the family


@register("cd")
class ConsistencyDistiller(Distiller):
    """CD with the LCM boundary parameterization, skipping-step teacher steps and an EMA target."""

    config_class = ConsistencyConfig
    paper = {"title": "Consistency Models", "arxiv": "2303.01469"}
    family = "consistency"
    quickstart_config = "consistency.yaml"
    supports_flow_teacher = True  # FlowTimeline
    needs_images = False  # prompt-only batches start from the teacher's guided DDIM (data_free_start)
    sampler_name = "consistency"
    scheduler_kind = "consistency"

    def __init__(self, teacher, config: ConsistencyConfig):
        super().__init__(teacher, config)
        extra = {"time_cond_proj_dim": config.guidance_embedding_dim} if config.guidance_embedding else {}
        if extra and "time_cond_proj_dim" not in self.teacher.model.config:
            raise ConfigError(f"distill.guidance_embedding needs a teacher network that takes a w-embedding "
                              f"(time_cond_proj_dim, as UNet2DConditionModel); {type(self.teacher.model).__name__} "
                              "has none: set distill.guidance_embedding = false")
        student = copy_student(self.teacher.model, **extra)
        if config.lora_rank:
            student = add_lora(student, config.lora_rank, config.lora_alpha, config.lora_target_modules or None)
        self.student_denoiser = self.teacher.with_model(student)
        self.student_guidance = guidance_input(student)  # the w-embedding, or none (guidance baked in)
        self.timeline = TIMELINES[type(self.teacher.schedule)](self.teacher.schedule, config)
        require_null_condition(self.teacher, config.guidance_scale_min, config.guidance_scale_max)
        decode = self.codec.differentiable_decode if self.codec.latent else None
        self.distance = Distance(config.loss, huber_c=config.huber_c, decode=decode)
        self._target = None

    def ema_rates(self):
        return {"student": {"target": self.config.target_ema_decay}} if self.config.target == "ema" else {}

    # -- the map each method defines ---------------------------------------------------------------
    def boundary(self, t: torch.Tensor, like: torch.Tensor):
        """c_skip, c_out at continuous t, shaped to broadcast against `like`."""
        c_skip, c_out = self.timeline.boundary(torch.as_tensor(t))
        return _bcast(c_skip.to(like.device).float(), like), _bcast(c_out.to(like.device).float(), like)

    def consistency_fn(self, denoiser, x, t, cond):
        """LCM's f(x, t) = c_skip(t) x + c_out(t) x0(x, t)."""
        return ConsistencyFunction(denoiser, self.boundary).predict(x, t, cond).x0

    def draw_times(self, n: int, device, step: int):
        """(t_n, t_{n-1}, s): start, teacher-step end and landing time of each example."""
        idx = torch.randint(1, self.config.num_ddim_timesteps + 1, (n,), device=device)
        return self.timeline.grid(idx), self.timeline.grid(idx - 1), None

    def online(self, den, x, t, s, cond):
        return self.consistency_fn(den, x, t, cond)

    def target_map(self, den, x, t, s, cond):
        return self.consistency_fn(den, x, t, cond)

    # -- shared pieces -------------------------------------------------------------------------------
    def student_cond(self, cond: dict, w: torch.Tensor | None, n: int) -> dict:
        """The student's inputs: the condition, plus the w-embedding for a w-conditioned student."""
        return self.student_guidance.condition(cond, w, n, self.device)

    def draw_guidance(self, n: int, device) -> torch.Tensor | None:
        return draw_scales(self.config.guidance_scale_min, self.config.guidance_scale_max, n, device)

    def target_denoiser(self):
        if self.config.target == "online":
            return self.student_denoiser
        if self._target is None:
            self._target = self.teacher.with_model(self.ema.module("student", "target"))
        return self._target

    @torch.no_grad()
    def data_free_start(self, n: int, t: torch.Tensor, cond: dict, w) -> torch.Tensor:
        """x_t for prompt-only batches: the teacher's guided DDIM from pure noise at t = 1 down to t."""
        x = torch.randn((n, *self.teacher_info.sample_shape), device=self.device)
        steps = self.config.data_free_steps
        for k in range(steps):
            hi, lo = 1 - (1 - t) * k / steps, 1 - (1 - t) * (k + 1) / steps
            x = solvers.ddim_step(self.teacher, x, hi, lo, cond, guidance=w)
        return x

    # -- training ----------------------------------------------------------------------------------
    def loss(self, batch, step, network):
        x0, cond = self.teacher_info.encode_batch(batch, self.device)
        n = self.teacher_info.batch_size(batch)
        device = self.device
        t, t_prev, s = self.draw_times(n, device, step)
        w = self.draw_guidance(n, device)
        if x0 is not None:
            x_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        else:
            x_t = self.data_free_start(n, t, cond, w)
        s_cond = self.student_cond(cond, w, n)

        pred = self.online(self.student_denoiser, x_t, t, s, s_cond)
        with torch.no_grad():
            x_prev = solvers.STEPS[self.config.solver](self.teacher, x_t, t, t_prev, cond, guidance=w)
            target = self.target_map(self.target_denoiser(), x_prev, t_prev, s, s_cond)
        return {"loss": self.distance(pred, target).mean()}

    # -- sampling and export -------------------------------------------------------------------------
    def sampling_times(self, steps: int) -> torch.Tensor:
        """The exported scheduler's times for `steps` steps (descending)."""
        return self.timeline.consistency_times(steps)

    def default_sample_guidance(self) -> float:
        return self.config.sample_guidance_scale or self.config.guidance_scale_min

    def sampling_setup(self, noise, cond, networks, guidance_scale):
        """The student denoiser with `networks`' weights, and its inputs (w embedded at the sampling scale)."""
        den = self.student_denoiser if networks is None else self.teacher.with_model(networks["student"])
        w = None
        if self.config.guidance_embedding:
            scale = guidance_scale if guidance_scale is not None else self.default_sample_guidance()
            w = torch.full((noise.shape[0],), float(scale))
        return den, self.student_cond(cond or {}, w, noise.shape[0])

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale=None):
        """Multistep consistency sampling, as LCMScheduler."""
        den, s_cond = self.sampling_setup(noise, cond, networks, guidance_scale)
        return sample_consistency(ConsistencyFunction(den, self.boundary), noise, self.sampling_times(steps),
                                  {"cond": s_cond}, generator=generator)

    def export_scheduler(self, steps):
        return self.timeline.scheduler(self.scheduler_kind, self.teacher_info, self.student_denoiser.prediction_type)

    def eval_guidance_scales(self):
        return [self.default_sample_guidance()] if self.config.guidance_embedding else [None]

    def model_card(self):
        card = {"sampling": f"{self.sampler_name} sampling; {self.config.num_ddim_timesteps}-point skipping grid"}
        if self.config.guidance_embedding:
            card["guidance"] = (f"w-embedded student: pass guidance_scale in [{self.config.guidance_scale_min}, "
                                f"{self.config.guidance_scale_max}] (diffusers convention); no CFG batch is run")
        elif self.draw_guidance(1, "cpu") is not None:
            card["guidance"] = (f"teacher guidance {self.config.guidance_scale_min}..{self.config.guidance_scale_max} "
                                "is baked in: sample with guidance_scale=1 (no CFG)")
        if self.config.lora_rank:
            card["lora"] = (f"rank {self.config.lora_rank}; `pipe.load_lora_weights(<this dir>/lora)` on the teacher "
                            "pipeline, then `pipe.fuse_lora()` if wanted")
        return card


@register("lcm")
class LCMDistiller(ConsistencyDistiller):
    """Latent consistency distillation: CD with guided teacher steps and the w-embedding (or LCM-LoRA)."""

    config_class = LCMConfig
    paper = {"title": "Latent Consistency Models", "arxiv": "2310.04378"}
    quickstart_config = "lcm.yaml"


@register("tcd")
class TCDDistiller(ConsistencyDistiller):
    """Trajectory consistency: the student learns x_t -> x_s for s <= t in the semi-linear (DDIM) form."""

    config_class = TCDConfig
    paper = {"title": "Trajectory Consistency Distillation", "arxiv": "2402.19159"}
    quickstart_config = "tcd.yaml"
    sampler_name = "tcd"
    scheduler_kind = "tcd"

    def draw_times(self, n, device, step):
        # s on the grid at or below the target time: m ~ U{0, ..., n-1} (TCD's trajectory-mapping training)
        idx = torch.randint(1, self.config.num_ddim_timesteps + 1, (n,), device=device)
        m = torch.floor(torch.rand(n, device=device) * idx).long()
        return self.timeline.grid(idx), self.timeline.grid(idx - 1), self.timeline.grid(m)

    def online(self, den, x, t, s, cond):
        return jump(den, x, t, s, cond)

    def target_map(self, den, x, t, s, cond):
        return jump(den, x, t, s, cond)

    def sampling_times(self, steps):
        return self.timeline.tcd_times(steps)[:-1]

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale=None,
               gamma: float | None = None):
        """Strategic stochastic sampling, as TCDScheduler with eta = gamma."""
        gamma = self.config.gamma if gamma is None else gamma
        den, s_cond = self.sampling_setup(noise, cond, networks, guidance_scale)
        times = self.timeline.tcd_times(steps)
        return sample_tcd(den, noise, times, {"cond": s_cond}, generator=generator,
                          landing=self.timeline.tcd_s(times[1:], gamma), gamma=gamma)

    def pipeline_kwargs(self):
        # TCDScheduler takes gamma as eta; the flow export's sampler is fixed by its scheduler config
        return {"eta": self.config.gamma} if isinstance(self.timeline, VPTimeline) else {}

    def model_card(self):
        card = super().model_card()
        how = (f"TCDScheduler: pass eta={self.config.gamma} to the pipeline" if isinstance(self.timeline, VPTimeline)
               else "FlowGridScheduler, gamma in its config")
        card["sampling"] += f"; gamma {self.config.gamma} ({how})"
        return card


@register("pcm")
class PhasedConsistencyDistiller(ConsistencyDistiller):
    """Multi-phase consistency: K ODE segments, each mapped to its lower edge (PCM); K may fall by stages (Hyper-SD)."""

    config_class = PCMConfig
    paper = {"title": "Phased Consistency Models", "arxiv": "2405.18407"}
    quickstart_config = "pcm.yaml"
    sampler_name = "phased-ddim"
    scheduler_kind = "phased"

    def phases_at(self, step: int) -> int:
        """K in effect at optimizer step `step` (the stage plan, else num_phases)."""
        plan = self.config.stage_phases
        if not plan:
            return self.config.phases
        return plan[min(step // max(self.config.stage_steps, 1), len(plan) - 1)]

    def milestones(self):
        """Each Hyper-SD stage but the last leaves its K-phase student, sampled in K steps (student-<K>phases/)."""
        plan = self.config.stage_phases
        return [((j + 1) * self.config.stage_steps, f"student-{k}phases", k) for j, k in enumerate(plan[:-1])]

    @property
    def final_phases(self) -> int:
        return self.config.stage_phases[-1] if self.config.stage_phases else self.config.phases

    def lower_edge(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """The largest phase edge strictly below t (edges: the K-step grid of the exported scheduler)."""
        edges = self.timeline.phase_edges(k).to(t.device)  # descending, ends at the clean end
        below = edges[None, :] < t[:, None] - 1e-6
        return torch.where(below, edges[None, :], -1.0).max(1).values

    def draw_times(self, n, device, step):
        idx = torch.randint(1, self.config.num_ddim_timesteps + 1, (n,), device=device)
        t = self.timeline.grid(idx)
        edge = self.lower_edge(t, self.phases_at(step))
        return t, torch.maximum(self.timeline.grid(idx - 1), edge), edge  # the teacher step stops at the edge

    def online(self, den, x, t, s, cond):
        return jump(den, x, t, s, cond)

    def target_map(self, den, x, t, s, cond):
        return jump(den, x, t, s, cond)  # = x itself when t is the edge (PCM's c_skip = 1)

    def sampling_times(self, steps):
        return self.timeline.phase_edges(steps)

    def export_scheduler(self, steps):
        """Lands on the trained edges: DDIM (trailing) where K divides T, else Euler (999 -> 666 -> 332 -> 0 at K = 3,
        where DDIM would step 666 -> 333); flow teachers: FlowGridScheduler on shift(k / K). No x0 clipping."""
        return grid_scheduler(self.teacher_info, self.student_denoiser.prediction_type, steps, clip=False)

    @torch.no_grad()
    def sample(self, noise, cond, steps, networks=None, generator=None, guidance_scale=None):
        """One deterministic DDIM jump per phase, along the exported scheduler's `steps`-step grid."""
        den, s_cond = self.sampling_setup(noise, cond, networks, guidance_scale)
        return sample_ode(den, noise, self.sampling_times(steps).to(noise.device), {"cond": s_cond})

    def model_card(self):
        card = super().model_card()
        plan = self.config.stage_phases or [self.config.phases]
        card["sampling"] = (f"deterministic jumps between phase edges ({type(self.export_scheduler(1)).__name__}); "
                            f"trained with K = {' -> '.join(map(str, plan))} phases; best at {self.final_phases} steps")
        return card
