"""The Distiller interface: what every method defines, and nothing about devices or checkpoints."""

from __future__ import annotations

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
    """A method: builds the student (and auxiliary networks) from a teacher and defines the loss.

    loss(batch, step) returns a dict whose entries named after trainable groups are the losses
    the trainer optimizes; every other entry is logged.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = DistillerConfig
    paper: ClassVar[dict] = {}  # {"title": ..., "arxiv": ...} for the model card
    find_unused_parameters: ClassVar[bool] = False
    sampler_name: ClassVar[str] = ""  # the student's sampler, as reported in quality tables

    def __init__(self, teacher, config):
        super().__init__()
        self.teacher_info = teacher  # the Teacher record: pipeline, conditioner, shapes
        self.teacher = teacher.denoiser
        self.codec = teacher.codec
        self.config = config
        self.ema = None

    # -- what the trainer asks ---------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        """The network that is exported (and whose EMA the trainer keeps)."""
        raise NotImplementedError

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    def frozen_modules(self) -> list[nn.Module]:
        """Networks that never train; the trainer may cast them to the mixed-precision dtype."""
        return [self.teacher.model, self.codec]

    def ema_rates(self) -> dict[str, float]:
        """EMA copies of the student the method itself needs (e.g. a consistency target)."""
        return {}

    def bind_ema(self, ema) -> None:
        self.ema = ema

    def forward(self, batch, step: int):
        return self.loss(batch, step)

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- sampling and export -------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: dict, steps: int, generator=None, model: nn.Module | None = None):
        """The student's own sampler: noise -> x0 in model space, with `model` weights (default: student)."""
        raise NotImplementedError

    def export_scheduler(self, steps: int):
        """A diffusers scheduler that samples the student in `steps` steps."""
        raise NotImplementedError

    def model_card(self) -> dict:
        """Method-specific facts for the model card."""
        return {}

    def eval_guidance_scales(self) -> list[float | None]:
        """Guidance scales the student is evaluated at (None: its sampler's default)."""
        return [None]

    def milestones(self) -> list[tuple[int, str, int]]:
        """Students exported during the run besides the final one: (optimizer step, folder under output_dir,
        sampling steps). Hyper-SD's stages each leave one (its K-step student); default none."""
        return []

    @classmethod
    def stages(cls, cfg) -> list:
        """The runs one config stands for, in order; default: itself.

        A method that trains in several runs (progressive rounds, each taught by the previous run's
        exported student) expands here. Each stage is a whole run with its own output_dir, so it
        checkpoints and resumes on its own and the trainer never knows about stages.
        """
        return [cfg]

    @property
    def device(self) -> torch.device:
        return next(self.teacher.model.parameters()).device
