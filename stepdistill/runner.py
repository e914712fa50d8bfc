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
    teacher = load_teacher(cfg.teacher, vae=cfg.vae)
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
    check_output_dir(cfg)
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg, evaluator=evaluator)
    trainer.resume()  # a wrong checkpoint stops here, before anything is written
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


IDENTITY = ("method", "teacher", "seed", "distill")  # what makes a run another run (not its length or logging)


def check_output_dir(cfg: RunConfig) -> None:
    """Refuse an output_dir whose config.yaml is another run's: resuming it would mix two runs' checkpoints."""
    path = Path(cfg.output_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    new = to_dict(cfg)
    if not isinstance(old, dict):
        old = {}
    if old.get("method") != cfg.method:
        diff = f"method {old.get('method')}, not {cfg.method}"
    else:
        wrong = [k for k in IDENTITY if k in old and old[k] != new[k]]
        if not wrong:
            return
        if wrong[0] == "distill":
            keys = [k for k in new["distill"] if old["distill"].get(k) != new["distill"][k]]
            diff = f"distill.{keys[0]} = {old['distill'].get(keys[0])!r}, not {new['distill'][keys[0]]!r}" if keys else "distill"
        else:
            diff = f"{wrong[0]} = {old[wrong[0]]!r}, not {new[wrong[0]]!r}"
    raise ConfigError(f"output_dir {cfg.output_dir} holds another run ({diff}); choose another output_dir, "
                      "or delete that folder to start over")


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
    if not (run_dir / "config.yaml").is_file():
        raise StepdistillError(f"{run_dir} is not a training output folder (no config.yaml); pass the output_dir of "
                               "a `stepdistill train` run")
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
