"""Reflow pairs: noise z and the teacher's probability-flow ODE solution x = ODE(z), written as resumable shards.

The pairs are the coupling rectified flow straightens (Liu et al. 2022, arXiv 2209.03003). A VP teacher is
solved with DDIM or Heun on its trailing grid (x0 clipped to the data range where its scheduler clips), a
flow-matching teacher with Euler or Heun on its flow grid; classifier-free guidance at `guidance_scale`.
Conditions go in turn: class j % num_classes for class-conditional teachers, prompt j % len(prompts) for text
teachers. Each shard holds `noise`, `sample` (n, C, H, W float32, model space) and `class_labels` (n,) int64
for class-conditional teachers; text teachers' prompts are a JSON list in the shard's metadata key `prompts`.
The folder's manifest.json (stages.GenerationStage) names the settings and shards; training/pairs.py reads it.

Used as `stepdistill reflow-pairs TEACHER --num N --out DIR` and as stage kind `reflow_pairs` in `stages:`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .config import check_range, from_dict, option
from .errors import ConfigError, StepdistillError
from .stages import GenerationStage, register_stage_kind


@dataclass
class PairsOptions:
    """How pairs are made (the options of a `reflow_pairs` stage, or `stepdistill reflow-pairs` flags)."""

    num: int = option(10000, "number of pairs")
    teacher: str | None = option(None, "teacher pipeline (default: the config's teacher)")
    steps: int = option(50, "ODE steps (METHODS: 50-100 DDIM for a VP teacher; RF++ used Heun with 18 EDM steps)")
    solver: Literal["ddim", "euler", "heun"] = option("ddim", "ODE solver: ddim (= euler, first order) or heun")
    guidance_scale: float = option(1.0, "classifier-free guidance scale while solving (1: none; InstaFlow used CFG)")
    seed: int | None = option(None, "seed of the noise (default: the config's seed, or 0)")
    shard_size: int = option(1000, "pairs per shard file (a crash loses at most one shard)")
    batch_size: int = option(250, "pairs solved together")
    prompts: str | None = option(None, "text teachers: a file of prompts, one a line, used in turn")

    def __post_init__(self):
        check_range("num", self.num, 1)
        check_range("steps", self.steps, 1)
        check_range("shard_size", self.shard_size, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("guidance_scale", self.guidance_scale, 0)


def read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise StepdistillError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise StepdistillError(f"prompt file {path} holds no prompts")
    return prompts


class ReflowPairs(GenerationStage):
    """`options.num` (noise, teacher ODE sample) pairs from `teacher` (a pipeline folder or hub id)."""

    unit = "pairs"

    def __init__(self, name: str, output_dir, teacher: str, options: PairsOptions):
        self.teacher_source, self.options = str(teacher), options
        self.prompts = read_prompts(options.prompts)
        settings = {"teacher": self.teacher_source, "steps": options.steps, "solver": options.solver,
                    "guidance_scale": options.guidance_scale,
                    "prompts_sha256": hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()[:16]
                    if self.prompts else None}
        super().__init__(name, output_dir, options.num, options.shard_size, options.seed or 0, settings)
        self._teacher = None

    @property
    def teacher(self):
        """The teacher, loaded on first use (a finished stage never loads it), on this process's device."""
        if self._teacher is None:
            from accelerate import PartialState

            from .teacher import load_teacher

            t = load_teacher(self.teacher_source).to(PartialState().device)
            kind = t.conditioner.kind
            if kind == "text" and not self.prompts:
                raise StepdistillError(f"{self.teacher_source} is a text-to-image teacher: give pairs a prompt file "
                                       "(--prompts FILE, or the stage option prompts)")
            if self.options.guidance_scale != 1.0 and t.denoiser.null_cond is None:
                raise StepdistillError(f"guidance_scale {self.options.guidance_scale}: {self.teacher_source} has no "
                                       "null condition for classifier-free guidance; use 1")
            self._teacher = t
        return self._teacher

    def raw_conditions(self, start: int, count: int) -> dict:
        """The conditions of pairs start .. start+count-1, as a data batch holds them."""
        t = self.teacher
        index = range(start, start + count)
        if t.conditioner.kind == "class":
            return {"class_labels": torch.tensor([j % t.conditioner.num_classes for j in index], dtype=torch.int64)}
        if t.conditioner.kind == "text":
            return {"prompt": [self.prompts[j % len(self.prompts)] for j in index]}
        return {}

    def solve(self, noise: torch.Tensor, raw: dict) -> torch.Tensor:
        """The teacher's ODE from `noise` at its top time to the clean end (model space)."""
        from .export import data_clip
        from .samplers import sample_ode

        t = self.teacher
        grid = t.denoiser.schedule.sampling_grid(self.options.steps, "trailing")
        w = self.options.guidance_scale
        device = next(t.model.parameters()).device
        cond = t.conditioner.encode(raw, device)
        return sample_ode(t.denoiser, noise.to(device), grid, {"cond": cond, "guidance": None if w == 1 else w},
                          solver=self.options.solver, clip_x0=data_clip(t)).float().cpu()

    def make_shard(self, index, start, count, generator):
        noise = torch.randn((count, *self.teacher.sample_shape), generator=generator)
        raw = self.raw_conditions(start, count)
        bs = self.options.batch_size
        samples = []
        for b in range(0, count, bs):
            part = {k: v[b:b + bs] for k, v in raw.items()}
            samples.append(self.solve(noise[b:b + bs], part))
        out = {"noise": noise, "sample": torch.cat(samples)}
        if "class_labels" in raw:
            out["class_labels"] = raw["class_labels"]
        return out

    def shard_metadata(self, index, start, count):
        if not self.prompts:
            return {}
        return {"prompts": json.dumps([self.prompts[j % len(self.prompts)] for j in range(start, start + count)])}


def options_from(data: dict, where: str) -> PairsOptions:
    """Validated PairsOptions from a mapping (unknown keys and bad values named with `where`)."""
    return from_dict(PairsOptions, data, where)


@register_stage_kind("reflow_pairs")
def pairs_stage(base_cfg, name: str, output_dir, options: dict) -> ReflowPairs:
    """A `reflow_pairs` entry of `stages:`: its teacher, seed and prompt file default to the config's."""
    opts = options_from(options, f"stages.{name}.options")
    if opts.seed is None:
        opts.seed = base_cfg.seed
    if opts.prompts is None and base_cfg.data.dataset == "prompts":
        opts.prompts = base_cfg.data.path
    teacher = opts.teacher or base_cfg.teacher
    if not teacher:
        raise ConfigError(f"stages.{name}: no teacher to make pairs from")
    return ReflowPairs(name, output_dir, teacher, opts)
