"""Full-length quickstart runs on the digits world, checked against the teacher's DDIM: a quality benchmark.

The CI's slow stage keeps the README's main job (cd) and the progressive rounds; every other method's
end-to-end run lives here, with its goal, and its last measured table in benchmarks/RESULTS-quickstart.md:

    python benchmarks/quickstart_quality.py lcm tcd pcm --output-dir runs/quality

Goals per method (exit status 1 when one fails): the student beats the teacher's DDIM at 1 and 2 steps,
its 4-step sample beats the teacher's 2-step DDIM, and every stage or round student (pcm's K-step students) beats
the teacher at its own step count.
"""

from __future__ import annotations

import argparse
import sys
import time

from stepdistill.quickstart import format_table, quickstart


def goals(method: str, rows: list[dict]) -> list[tuple[str, bool]]:
    """(goal, met) for one method's rows of a quickstart table."""
    fid = {(r["model"], r["steps"]): r["fid"] for r in rows if "run" not in r}
    out = [(f"{method} {s}-step FID {fid[method, s]:.2f} < teacher DDIM {fid['teacher', s]:.2f}",
            fid[method, s] < fid["teacher", s]) for s in (1, 2) if (method, s) in fid]
    if (method, 4) in fid:
        out.append((f"{method} 4-step FID {fid[method, 4]:.2f} < teacher 2-step DDIM {fid['teacher', 2]:.2f}",
                    fid[method, 4] < fid["teacher", 2]))
    for r in rows:
        if r["model"] == method and "run" in r:  # a stage's or round's student, at its own step count
            base = fid["teacher", r["steps"]]
            out.append((f"{method} {r['run']} {r['steps']}-step FID {r['fid']:.2f} < teacher DDIM {base:.2f}",
                        r["fid"] < base))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="+")
    p.add_argument("--output-dir", default="runs/quality")
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = quickstart(args.methods, args.output_dir, num_samples=args.num_samples,
                      overrides=["train.progress_bar=false", "train.report_to=none"])
    print(f"\n{format_table(rows)}\n\nwall time {time.perf_counter() - start:.0f} s")
    failed = 0
    for method in args.methods:
        for text, met in goals(method, [r for r in rows if r["model"] in (method, "teacher")]):
            print(("met   " if met else "FAILED"), text)
            failed += not met
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
