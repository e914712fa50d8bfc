"""A whole run from a config: load the teacher, build the method, train, export, write sample grids."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .config import RunConfig, to_dict
from .errors import ConfigError
from .distillers import get_distiller_class
from .export import export_student
from .kernels.dispatch import apply_attention_backend
from .stages import build_stages
from .stages import run_stages as run_stage_list
from .teacher import load_teacher
from .training.data import build_dataset
from .training.trainer import Trainer


def build(cfg: RunConfig):
    """Teacher, distiller and dataset for a config (seeded, so student initialisation is reproducible)."""
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():  # process-wide, as diffusers' --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    teacher = load_teacher(cfg.teacher)
    teacher.conditioner.prepare(cfg.data)
    distiller = get_distiller_class(cfg.method)(teacher, cfg.distill)
    apply_attention_backend(distiller, cfg.kernels.attention)  # teacher, student and auxiliary networks
    dataset = build_dataset(cfg.data, teacher)
    if distiller.needs_images and not dataset.has_images:
        raise ConfigError(f"method {cfg.method!r} trains on images, and data.dataset = {cfg.data.dataset!r} has none; "
                          "use data.dataset = digits or folder")
    return teacher, distiller, dataset


def run(cfg: RunConfig, evaluator=None) -> Trainer:
    """Train and export to output_dir/student; returns the finished trainer (distiller, EMA, weights)."""
    if evaluator is None and cfg.eval.every > 0:
        from .eval.evaluator import make_evaluator

        evaluator = make_evaluator(cfg)
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg, evaluator=evaluator)
    out = Path(cfg.output_dir)
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.export(student_dir(cfg), cfg.export.steps[0])
        for steps in cfg.export.steps[1:]:
            trainer.sample_grid(out / "samples" / f"student-{steps}step.png", steps)
    trainer.finish()
    return trainer


def student_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "student"


def run_stages(cfg: RunConfig) -> list:
    """Run every stage a config stands for (its `stages:` list or Distiller.stages), skipping finished ones and
    resuming an interrupted one from its own checkpoints or shards; returns the stages."""
    return run_stage_list(build_stages(cfg))


def export_run(run_dir, steps: int | None = None, weights: str | None = None, out=None) -> Path:
    """Export a run's latest checkpoint (`stepdistill export`)."""
    from .config import load_config
    from .errors import StepdistillError
    from .training import checkpoint as ckpt

    run_dir = Path(run_dir)
    if steps is not None and steps < 1:
        raise StepdistillError(f"--steps {steps}: a student samples in at least 1 step")
    overrides = [f"output_dir={run_dir}"] + ([f"train.export_weights={weights}"] if weights else [])
    cfg = load_config(run_dir / "config.yaml", overrides)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise StepdistillError(f"{run_dir} has no checkpoints to export")
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg)
    trainer.load_checkpoint(latest)
    out = Path(out) if out else student_dir(cfg)
    export_student(distiller, out, steps or cfg.export.steps[0], networks=trainer.export_networks(),
                   config=to_dict(cfg), lora_only=cfg.export.lora_only)
    return out
