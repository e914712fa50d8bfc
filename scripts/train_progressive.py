"""Progressive distillation (Salimans & Ho 2022) or guidance distillation (Meng et al. 2023) from a YAML config.

    python scripts/train_progressive.py                                       # digits: rounds 64 -> 32 -> ... -> 1
    python scripts/train_progressive.py --config training_configs/digits/guidance.yaml
    python scripts/train_progressive.py train.max_steps=500                   # key=value overrides

Each round (and guidance stage) is its own run in its own folder under output_dir; running the
command again skips finished rounds and resumes an interrupted one from its own checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.config import load_config  # noqa: E402
from stepdistill.errors import StepdistillError  # noqa: E402
from stepdistill.runner import run_stages, student_dir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "training_configs/digits/progressive.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        for stage in run_stages(load_config(args.config, args.overrides)):
            print(f"student written to {student_dir(stage)}")
    except StepdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
