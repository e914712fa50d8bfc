"""The Distiller interface: what every method defines, and nothing about devices or checkpoints.

A method names its trainable networks (`trainable_networks`, grouped under optimizers by `optimizer_groups`),
says which groups update at each optimizer step (`update_plan`), and gives each one's loss
(`loss(batch, step, network)`). The trainer runs, per planned
network, forward, backward, clipping and the optimizer step, and clears every network's gradients, so no
loss reaches a network it was not meant for. What is kept as EMA and exported is `exported_networks`; the
method builds its own pipeline from them (`build_pipeline`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

REGISTRY: dict[str, type["Distiller"]] = {}


def register(name: str):
    """Class decorator: make a Distiller available as `method: name` in configs."""

    def wrap(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


@dataclass
class DistillerConfig:
    """Base of every method's config (the `distill:` section)."""


class Distiller(nn.Module):
    """A method: builds the student (and auxiliary networks) from a teacher and defines the losses."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = DistillerConfig
    paper: ClassVar[dict] = {}  # {"title": ..., "arxiv": ...} for the model card
    family: ClassVar[str] = ""  # the training script that runs it: scripts/train_<family>.py
    quickstart_config: ClassVar[str | None] = None  # training_configs/digits/<file> for `stepdistill quickstart`
    hidden: ClassVar[bool] = False  # not a distillation method (plain diffusion training of teachers)
    needs_images: ClassVar[bool] = True  # False: trains data-free on conditions alone (data.dataset prompts/none)
    find_unused_parameters: ClassVar[bool] = False
    sampler_name: ClassVar[str] = ""  # the student's sampler, as reported in quality tables
    # runs on flow-matching teachers (`stepdistill quickstart --teacher flow` runs it on the flow digits teacher);
    # a method that does not is skipped there, with flow_teacher_reason printed
    supports_flow_teacher: ClassVar[bool] = False
    flow_teacher_reason: ClassVar[str] = "the method does not declare flow-teacher support (supports_flow_teacher)"

    def __init__(self, teacher, config):
        super().__init__()
        self.teacher_info = teacher  # the Teacher record: pipeline, conditioner, shapes
        self.teacher = teacher.denoiser
        self.codec = teacher.codec
        self.config = config
        self.ema = None  # the trainer's EMAs of the exported networks (training.ema.EMASet)
        self.run_seed = 0

    # -- what the trainer asks ---------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        """The student network (unwrapped)."""
        return self.student_denoiser.network

    def trainable_networks(self) -> dict[str, nn.Module]:
        """The networks that train, by group name; each gets its own optimizer and `train.groups.<name>` settings."""
        return {"student": self.student}

    def optimizer_groups(self) -> dict[str, list[str]]:
        """Networks that update together under one optimizer, by group name (default: each network alone).

        A group of several networks (DMD2's fake score and its GAN head) shares one loss, optimizer and
        `train.groups.<name>` settings; each network is still prepared for DDP on its own."""
        return {name: [name] for name in self.trainable_networks()}

    def update_plan(self, step: int) -> list[str]:
        """The optimizer groups updated at optimizer step `step`, in order (default: all, every step)."""
        return list(self.optimizer_groups())

    def loss(self, batch: dict, step: int, network: str) -> dict[str, torch.Tensor]:
        """Group `network`'s loss on `batch` under key "loss" (a scalar); other entries are logged."""
        raise NotImplementedError

    def exported_networks(self) -> dict[str, nn.Module]:
        """The networks EMA covers and the export writes (default: the student)."""
        return {"student": self.student}

    def frozen_modules(self) -> list[nn.Module]:
        """Networks that never train; the trainer may cast them to the mixed-precision dtype."""
        return [self.teacher.model, self.codec]

    def ema_rates(self) -> dict[str, dict[str, float]]:
        """EMA copies the method itself needs, per exported network (e.g. {"student": {"target": 0.95}})."""
        return {}

    def bind(self, ema, seed: int) -> None:
        """Called by the trainer before training: the EMAs and the run's seed."""
        self.ema = ema
        self.run_seed = seed

    def shared_generator(self, step: int, device="cpu") -> torch.Generator:
        """A generator that draws the same values on every process at `step` (and again after a resume), for
        decisions all processes must agree on (DMD2's backward-simulation step)."""
        digest = hashlib.sha256(f"{self.run_seed}/{step}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def train(self, mode: bool = True):
        """Only trainable networks follow `mode`; the teacher, the VAE and LPIPS stay in eval mode."""
        super().train(False)
        for net in self.trainable_networks().values():
            net.train(mode)
        return self

    def forward(self, *args, **kwargs):
        return self.loss(*args, **kwargs)

    # -- sampling and export -------------------------------------------------------------------
    def networks_or_live(self, networks: dict[str, nn.Module] | None) -> dict[str, nn.Module]:
        return networks if networks is not None else self.exported_networks()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: dict, steps: int, networks: dict[str, nn.Module] | None = None,
               generator=None, guidance_scale: float | None = None) -> torch.Tensor:
        """The student's own sampler: noise -> x0 in model space with `networks` (default: the live ones)."""
        raise NotImplementedError

    def export_scheduler(self, steps: int):
        """A diffusers scheduler that samples the student in `steps` steps."""
        raise NotImplementedError

    def build_pipeline(self, networks: dict[str, nn.Module], steps: int):
        """The student pipeline: the teacher's pipeline with the student network and a `steps`-step scheduler."""
        from ..export import teacher_pipeline_with

        return teacher_pipeline_with(self.teacher_info, networks["student"], self.export_scheduler(steps), steps)

    def pipeline_kwargs(self) -> dict:
        """Extra keyword arguments of the student pipeline's __call__ that sample it as trained (TCD's eta)."""
        return {}

    def model_card(self) -> dict:
        """Method-specific facts for the model card."""
        return {}

    def eval_guidance_scales(self) -> list[float | None]:
        """Guidance scales the student is evaluated at, passed to its pipeline (None: the pipeline's default)."""
        return [None]

    def milestones(self) -> list[tuple[int, str, int]]:
        """Students exported during the run besides the final one: (optimizer step, folder under output_dir,
        sampling steps). Hyper-SD's stages each leave one (its K-step student); default none."""
        return []

    @classmethod
    def stages(cls, cfg) -> list:
        """The stages one config stands for, in order (stepdistill.stages): RunConfigs (training runs) or Stage
        objects (generation, assembly). Default: one training run, the config itself."""
        return [cfg]

    @property
    def device(self) -> torch.device:
        return next(self.teacher.model.parameters()).device
