"""Train a consistency-family student (cd, lcm, tcd, pcm) from a config file.

    python scripts/train_consistency.py --config training_configs/digits/lcm.yaml
    python scripts/train_consistency.py --config training_configs/sd15/lcm_lora.yaml teacher=path/to/sd15 data.path=imgs
    python scripts/train_consistency.py --config training_configs/sd3/pcm.yaml train.max_steps=100   # key=value overrides

The student is exported to <output_dir>/student (a LoRA student also to <output_dir>/student/lora).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.config import load_config  # noqa: E402
from stepdistill.errors import StepdistillError  # noqa: E402
from stepdistill.runner import run, student_dir  # noqa: E402

FAMILY = ("cd", "lcm", "tcd", "pcm")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "training_configs/digits/lcm.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.method not in FAMILY:
            raise StepdistillError(f"{args.config}: method {cfg.method!r} is not a consistency method ({', '.join(FAMILY)})")
        run(cfg)
    except StepdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"student written to {student_dir(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
