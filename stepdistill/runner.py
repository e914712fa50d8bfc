"""A whole run from a config: load the teacher, build the method, train, export, write sample grids."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .config import RunConfig, to_dict
from .distillers import get_distiller_class
from .export import export_student
from .kernels.dispatch import apply_attention_backend
from .teacher import load_teacher
from .training.data import build_dataset
from .training.trainer import Trainer


def build(cfg: RunConfig):
    """Teacher, distiller and dataset for a config (seeded, so student initialisation is reproducible)."""
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg.teacher)
    teacher.conditioner.prepare(cfg.data)
    distiller = get_distiller_class(cfg.method)(teacher, cfg.distill)
    apply_attention_backend(distiller, cfg.kernels.attention)  # teacher, student and auxiliary networks
    dataset = build_dataset(cfg.data, teacher)
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


def stage_finished(cfg: RunConfig) -> bool:
    """A run is finished when its final checkpoint (step train.max_steps) and its exported student exist."""
    from .export import CARD_FILE
    from .training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
    return (latest is not None and latest.name == f"step-{cfg.train.max_steps:08d}"
            and (student_dir(cfg) / CARD_FILE).is_file())


def run_stages(cfg: RunConfig, evaluator=None) -> list[RunConfig]:
    """Run every stage a config stands for (Distiller.stages), skipping finished ones; returns the stages.

    One-run methods have one stage, `cfg` itself, which always runs (resuming as `run` does). For
    multi-run methods (progressive rounds) a crash in stage k leaves stages 1..k-1 finished, and the
    next call skips them and resumes stage k from its own checkpoints.
    """
    stages = get_distiller_class(cfg.method).stages(cfg)
    for i, stage in enumerate(stages, 1):
        if len(stages) > 1:
            tag = f"stage {i}/{len(stages)} ({stage.method}, {stage.output_dir})"
            if stage_finished(stage):
                print(f"{tag}: finished, skipped", flush=True)
                continue
            print(f"{tag}: training", flush=True)
        run(stage, evaluator=evaluator)
    return stages


def export_run(run_dir, steps: int | None = None, weights: str | None = None, out=None) -> Path:
    """Export a run's latest checkpoint (`stepdistill export`)."""
    from .config import load_config
    from .errors import StepdistillError
    from .training import checkpoint as ckpt

    run_dir = Path(run_dir)
    overrides = [f"output_dir={run_dir}"] + ([f"train.export_weights={weights}"] if weights else [])
    cfg = load_config(run_dir / "config.yaml", overrides)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise StepdistillError(f"{run_dir} has no checkpoints to export")
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg)
    trainer.load_checkpoint(latest)
    out = Path(out) if out else student_dir(cfg)
    export_student(distiller, out, steps or cfg.export.steps[0], model=trainer.export_module(), config=to_dict(cfg),
                   lora_only=cfg.export.lora_only)
    return out
