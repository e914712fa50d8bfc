"""Where the project's own files are: embedded samples and training configs.

Relative paths in configs are tried against the working directory first, then against the
project root (the folder holding samples/ and training_configs/), so the embedded default
works from any directory. STEPDISTILL_ROOT overrides the project root.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(os.environ.get("STEPDISTILL_ROOT", Path(__file__).resolve().parent.parent))
SAMPLES = PROJECT_ROOT / "samples"
CONFIGS = PROJECT_ROOT / "training_configs"
DIGITS_TEACHER = SAMPLES / "digits-teacher"
DIGITS_FLOW_TEACHER = SAMPLES / "digits-flow-teacher"  # flow matching, velocity prediction (scripts/train_teacher.py)
DIGITS_CLASSIFIER = SAMPLES / "digits-classifier"


def resolve(path: str | Path) -> Path:
    """`path` as given if it exists (or is absolute), else relative to the project root if it exists there."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    q = PROJECT_ROOT / p
    return q if q.exists() else p
