"""Progressive distillation (Salimans & Ho 2022) or guidance distillation (Meng et al. 2023) from a YAML config.

    python scripts/train_progressive.py                                       # digits: rounds 64 -> 32 -> ... -> 1
    python scripts/train_progressive.py --config training_configs/digits/guidance.yaml
    python scripts/train_progressive.py train.max_steps=500                   # key=value overrides

Each round (and guidance stage) is its own run in its own folder under output_dir; running the
command again skips finished rounds and resumes an interrupted one from its own checkpoints.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.cli import train_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_script(__doc__, str(ROOT / "training_configs/digits/progressive.yaml"), "progressive"))
