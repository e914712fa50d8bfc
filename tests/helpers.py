"""Shared helpers for tests: tiny run configs on saved tiny teachers."""

from __future__ import annotations

from stepdistill.config import load_config
from stepdistill.paths import CONFIGS

FAST = ["train.progress_bar=false", "train.report_to=none", "train.batch_size=4", "train.num_sample_images=4"]


def tiny_config(config_file: str, teacher, output_dir, *overrides):
    """A real config file from training_configs/, pointed at a tiny teacher, with sizes overridden."""
    return load_config(CONFIGS / config_file, [f"teacher={teacher}", f"output_dir={output_dir}", *FAST, *overrides])


def student_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.distiller.student.state_dict().items()}
