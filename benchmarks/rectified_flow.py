"""Straightness before and after reflow, and one-/two-step FID on uniform flow grids, from a quickstart's output.

    python benchmarks/rectified_flow.py OUT "reflow student=runs/qs/reflow/reflow/student" \
        "instaflow student=runs/qs-insta/instaflow/student"      # student pipeline folders; results in OUT

Straightness (Liu et al. 2022, Eq. 4, per dimension): for z ~ N(0, I), the model's flow ODE solved from t = 1 to 0
with K uniform Euler steps lands on x; then

    S = E_z (1/K) sum_k ||v(x_{t_k}, t_k) - (z - x)||^2 / d

is zero exactly when every trajectory is a straight line walked at constant speed. We also print S divided by
E ||z - x||^2 / d (scale-free). "Before reflow" is the VP teacher converted into flow time (VPAsFlow), "after"
the reflow student. FID rows sample with Euler on uniform grids t = 1, (N-1)/N, ..., 0 (the own sampler), which
differ from FlowMatchEulerDiscreteScheduler's default grid at N >= 2 (its last point before 0 is 1/1000).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepdistill.distillers.rectified_flow import as_flow_teacher
from stepdistill.eval.quality import DigitsFID, generate
from stepdistill.paths import DIGITS_TEACHER
from stepdistill.samplers import sample_ode
from stepdistill.teacher import load_teacher


@torch.no_grad()
def straightness(den, cond_of, n: int, k: int, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, 1, 16, 16), generator=g)
    cond = cond_of(torch.arange(n) % 10)
    grid = torch.linspace(1, 0, k + 1)
    x, velocities = z, []
    for i in range(k):
        t = grid[i].expand(n)
        v = den.raw(x, t, cond)
        velocities.append(v)
        x = x + (grid[i + 1] - grid[i]) * v
    chord = z - x
    s = torch.stack([((v - chord) ** 2).flatten(1).mean(1) for v in velocities]).mean()
    return s.item(), (s / (chord ** 2).flatten(1).mean(1).mean()).item()


def uniform_fid(den, encode, fid, steps: int, num: int) -> float:
    grid = torch.linspace(1, 0, steps + 1)
    return fid(generate(lambda z, labels, g: sample_ode(den, z, grid, {"cond": encode(labels)}, solver="euler"),
                        num, (1, 16, 16)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for rectified_flow_benchmark.json")
    p.add_argument("models", nargs="*", help="NAME=PIPELINE_FOLDER of flow students")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per FID")
    p.add_argument("--paths", type=int, default=200, help="trajectories for the straightness")
    p.add_argument("--euler-steps", type=int, default=32, help="Euler steps K of each trajectory")
    p.add_argument("--fid-steps", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--skip-teacher", action="store_true", help="measure only the students given")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(str(DIGITS_TEACHER))

    def encode(labels):
        return teacher.conditioner.encode({"class_labels": labels}, "cpu")

    models = {} if args.skip_teacher else {"teacher in flow time (before reflow)": as_flow_teacher(teacher)}
    for spec in args.models:
        name, folder = spec.split("=", 1)
        models[name] = load_teacher(folder).denoiser
    fid = DigitsFID()
    rows = []
    for name, den in models.items():
        start = time.perf_counter()
        s, rel = straightness(den, encode, args.paths, args.euler_steps)
        row = {"model": name, "straightness": s, "relative_straightness": rel}
        for steps in args.fid_steps:
            row[f"fid_uniform_{steps}"] = uniform_fid(den, encode, fid, steps, args.num_samples)
        row["seconds"] = time.perf_counter() - start
        print(json.dumps(row), flush=True)
        rows.append(row)
    (root / "rectified_flow_benchmark.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
