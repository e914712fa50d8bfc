"""Train a consistency-family student (cd, lcm, tcd, pcm) from a config file.

    python scripts/train_consistency.py --config training_configs/digits/lcm.yaml
    python scripts/train_consistency.py --config training_configs/sd15/lcm_lora.yaml teacher=path/to/sd15 data.path=imgs
    python scripts/train_consistency.py --config training_configs/sd3/pcm.yaml train.max_steps=100   # key=value overrides

The student is exported to <output_dir>/student (a LoRA student also to <output_dir>/student/lora).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.cli import train_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_script(__doc__, str(ROOT / "training_configs/digits/lcm.yaml"), "consistency"))
