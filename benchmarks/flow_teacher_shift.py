"""The flow digits teacher's Euler FID at several scheduler shifts (how FLOW_SHIFT in scripts/train_teacher.py
was chosen; the shift moves only the sampling grid, not the trained weights).

    python benchmarks/flow_teacher_shift.py --shifts 1 2 3 --steps 1 2 4 50 --num-samples 1000

Each row samples samples/digits-flow-teacher with flow-matching Euler on FlowSchedule(shift).sampling_grid
(the grid its FlowMatchEulerDiscreteScheduler pipeline uses), unclipped, unguided, same noise for every row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepdistill.eval.quality import DigitsFID, generate  # noqa: E402
from stepdistill.paths import DIGITS_FLOW_TEACHER  # noqa: E402
from stepdistill.samplers import sample_ode  # noqa: E402
from stepdistill.schedules import FlowSchedule  # noqa: E402
from stepdistill.teacher import load_teacher  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(DIGITS_FLOW_TEACHER))
    p.add_argument("--shifts", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 50])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    teacher = load_teacher(args.teacher)
    fid = DigitsFID()
    rows = []
    for shift in args.shifts:
        den = teacher.denoiser.with_model(teacher.model, schedule=FlowSchedule(teacher.denoiser.schedule.num_train_timesteps, shift))
        for steps in args.steps:
            grid = den.schedule.sampling_grid(steps)
            images = generate(lambda z, labels, g: sample_ode(
                den, z, grid, {"cond": teacher.conditioner.encode({"class_labels": labels}, "cpu")}, solver="euler"),
                args.num_samples, teacher.sample_shape, seed=0)
            rows.append({"shift": shift, "steps": steps, "fid": fid(images), "grid": [round(float(t), 4) for t in grid]})
            print(f"shift {shift:g}  steps {steps:>3}  FID {rows[-1]['fid']:.2f}  grid {rows[-1]['grid']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
