"""Rectified flow: reflow (RF / RF++), InstaFlow one-step distillation or SlimFlow, from a YAML config.

    python scripts/train_rectified_flow.py                                              # digits: pairs, then reflow
    python scripts/train_rectified_flow.py --config training_configs/digits/instaflow.yaml
    python scripts/train_rectified_flow.py train.max_steps=1000                         # key=value overrides

The config's stages (teacher pairs, reflow, distillation) each write their own folder under output_dir;
running the command again skips finished stages, keeps finished pair shards and resumes training from
its checkpoints. Pairs alone: `stepdistill reflow-pairs TEACHER --num N --out DIR`.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.cli import train_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_script(__doc__, str(ROOT / "training_configs/digits/reflow.yaml"), "rectified_flow"))
