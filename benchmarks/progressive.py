"""Progressive and guidance distillation on the digits world: quality per round and sampling cost.

    python benchmarks/progressive.py --out runs/bench-progressive            # train (or reuse) and measure
    python benchmarks/progressive.py --out runs/bench-progressive --max-steps 400 --num-samples 1000

1. Progressive distillation 64 -> 32 -> ... -> 1 steps (training_configs/digits/progressive.yaml, with
   --max-steps optimizer steps per round): FID of every round's student at its own step count against
   the teacher's DDIM (trailing, x0 clipped) at the same steps.
2. Guidance distillation (training_configs/digits/guidance.yaml): the guided student and its
   progressive rounds at w in {1, 2, 4} against the teacher with classifier-free guidance at the same w
   and steps.
3. Sampling cost of the exported pipelines, as plain diffusers runs them: network forward passes per
   image (counted by a forward hook on the UNet) and wall time, per round and for the guided student
   against the teacher's CFG.

Writes benchmarks/RESULTS-progressive.md (tables) and benchmarks/progressive_fid.png (plot). Training
reuses finished rounds in --out (each round is its own resumable run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.config import load_config  # noqa: E402
from stepdistill.eval.quality import DigitsFID  # noqa: E402
from stepdistill.paths import CONFIGS, DIGITS_TEACHER  # noqa: E402
from stepdistill.pipelines import ClassConditionalPipeline  # noqa: E402
from stepdistill.quickstart import stage_rows, teacher_rows  # noqa: E402
from stepdistill.runner import run_stages  # noqa: E402
from stepdistill.teacher import load_teacher  # noqa: E402


def count_and_time(pipe, steps: int, guidance: float, n: int, repeats: int) -> tuple[float, float]:
    """(network evaluations per image, median seconds per call) of one pipeline call on n images."""
    seen = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    labels = torch.arange(n) % 10
    times = []
    for r in range(repeats + 1):  # the first call warms up and is not timed
        seen.clear()
        g = torch.Generator().manual_seed(r)
        start = time.perf_counter()
        pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt")
        if r:
            times.append(time.perf_counter() - start)
    hook.remove()
    return sum(seen) / n, statistics.median(times)


def train(config: str, out: Path, teacher: str, overrides: list[str]):
    cfg = load_config(CONFIGS / "digits" / config, [f"teacher={teacher}", f"output_dir={out}",
                                                    "train.progress_bar=false", *overrides])
    return run_stages(cfg)


def plot(rows: list[dict], teacher_by_steps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(teacher_by_steps)
    ax.plot(steps, [teacher_by_steps[s] for s in steps], "o--", label="teacher DDIM (trailing)")
    st = sorted((r["steps"], r["fid"]) for r in rows)
    ax.plot([s for s, _ in st], [f for _, f in st], "s-", label="progressive student (its round's steps)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(steps)
    ax.set_xticklabels([str(s) for s in steps])
    ax.invert_xaxis()
    ax.set_xlabel("sampling steps (each round halves them)")
    ax.set_ylabel("FID in digits-classifier features (lower is better)")
    ax.set_title("Progressive distillation on the digits world")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-progressive")
    parser.add_argument("--teacher", default=str(DIGITS_TEACHER))
    parser.add_argument("--start-steps", type=int, default=64, help="teacher DDIM steps that round 1 halves")
    parser.add_argument("--max-steps", type=int, default=150, help="optimizer steps per progressive round")
    parser.add_argument("--guidance-steps", type=int, default=600, help="optimizer steps of guidance stage one")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--timing-batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(ROOT / "benchmarks/RESULTS-progressive.md"))
    args = parser.parse_args(argv)
    train_threads = torch.get_num_threads()
    out = Path(args.out)
    fid = DigitsFID()
    teacher = load_teacher(args.teacher)

    # 1. progressive rounds
    t0 = time.perf_counter()
    prog = train("progressive.yaml", out / "progressive", args.teacher, [f"train.max_steps={args.max_steps}",
                                                                         f"distill.start_steps={args.start_steps}"])
    prog_train_s = time.perf_counter() - t0
    prog_rows = [r for s in prog for r in stage_rows(s, fid, args.num_samples, 0, "progressive")]
    start = prog[0].config.distill.start_steps
    points = [(start >> r, None) for r in range(prog[0].config.distill.num_rounds + 1)]
    t_rows = teacher_rows(teacher, fid, args.num_samples, 0, out / "teacher_rows.json", points)
    teacher_fid = {r["steps"]: r["fid"] for r in t_rows}

    # 2. guidance distillation (stage one, then progressive rounds of the guided student)
    t0 = time.perf_counter()
    guid = train("guidance.yaml", out / "guidance", args.teacher, [f"train.max_steps={args.guidance_steps}",
                                                                   f"distill.progressive_max_steps={args.max_steps}"])
    guid_train_s = time.perf_counter() - t0
    guid_rows = []
    for s in guid:
        for r in stage_rows(s, fid, args.num_samples, 0, "guidance" if s.config.method == "guidance" else "guided-progressive"):
            guid_rows.append(r)
    g_points = [(r["steps"], r["guidance"]) for r in guid_rows]
    g_teacher = {(r["steps"], r.get("guidance", 1.0)): r["fid"]
                 for r in teacher_rows(teacher, fid, args.num_samples, 0, out / "teacher_rows.json", g_points)}

    # 3. sampling cost of the exported pipelines, on one thread (steadier timings than torch's thread pool)
    torch.set_num_threads(1)
    cost = []
    tpipe = ClassConditionalPipeline.from_pretrained(args.teacher)
    tpipe.set_progress_bar_config(disable=True)
    evals, secs = count_and_time(tpipe, start, 1.0, args.timing_batch, args.repeats)
    cost.append({"model": "teacher", "steps": start, "evals": evals, "seconds": secs})
    for s in prog:
        pipe = ClassConditionalPipeline.from_pretrained(s.student_dir)
        pipe.set_progress_bar_config(disable=True)
        n = s.config.export.steps[0]
        evals, secs = count_and_time(pipe, n, 1.0, args.timing_batch, args.repeats)
        cost.append({"model": f"round {s.config.distill.round}", "steps": n, "evals": evals, "seconds": secs,
                     "scheduler": type(pipe.scheduler).__name__})
    g_steps = guid[0].config.export.steps[0]
    cfg_cost = count_and_time(tpipe, g_steps, 2.0, args.timing_batch, args.repeats)
    gpipe = ClassConditionalPipeline.from_pretrained(guid[0].student_dir)
    gpipe.set_progress_bar_config(disable=True)
    emb_cost = count_and_time(gpipe, g_steps, 2.0, args.timing_batch, args.repeats)

    # report
    lines = ["# Progressive and guidance distillation on the digits world", "",
             f"Command: `python benchmarks/progressive.py --out {args.out} --start-steps {args.start_steps} "
             f"--max-steps {args.max_steps} "
             f"--guidance-steps {args.guidance_steps} --num-samples {args.num_samples}`", "",
             f"Teacher: `{args.teacher}`. FID: Frechet distance in the digits classifier's features, "
             f"{args.num_samples} samples (balanced classes, same noise for every row) against the 1,797 real digits; "
             "lower is better. Students sample with their own deterministic DDIM on the trailing grid "
             "(what the exported scheduler reproduces); the teacher with DDIM, trailing spacing, x0 clipped.", "",
             f"Training: {args.max_steps} optimizer steps per round (batch 64, lr 1e-4 decayed linearly to 0 per "
             f"round, truncated-SNR weighting, v student), {train_threads} CPU threads: progressive "
             f"{prog_train_s / 60:.1f} min, guidance (stage one {args.guidance_steps} steps + "
             f"{len(guid) - 1} rounds) {guid_train_s / 60:.1f} min (0 when reused from --out).", "",
             "## 1. FID after each round", "",
             "| round | steps | student FID | teacher DDIM FID, same steps |", "|---|---|---|---|",
             f"| 0 (teacher) | {start} | - | {teacher_fid[start]:.2f} |"]
    for s, r in zip(prog, prog_rows):
        lines.append(f"| {s.distill.round} | {r['steps']} | {r['fid']:.2f} | {teacher_fid[r['steps']]:.2f} |")
    lines += ["", "![FID per round](progressive_fid.png)", "",
              "## 2. Guided student against the teacher's classifier-free guidance", "",
              "Stage one: one network pass with w embedded; teacher: two passes (conditional + null class).", "",
              "| student | steps | w | student FID | teacher CFG FID, same w and steps |", "|---|---|---|---|---|"]
    for r in guid_rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.2f} | "
                     f"{g_teacher[(r['steps'], r['guidance'])]:.2f} |")
    lines += ["", "## 3. Sampling cost of the exported pipelines", "",
              f"`ClassConditionalPipeline.from_pretrained(...)` on {args.timing_batch} images, median of "
              f"{args.repeats} calls, one CPU thread; network evaluations per image counted by a forward hook on the "
              "UNet (a CFG call on a doubled batch counts 2).", "",
              "| model | steps | scheduler | evaluations / image | seconds / call | ratio to the previous row |",
              "|---|---|---|---|---|---|"]
    prev = None
    for c in cost:
        ratio = f"{c['seconds'] / prev['seconds']:.2f} (evals {c['evals'] / prev['evals']:.2f})" if prev else "-"
        lines.append(f"| {c['model']} | {c['steps']} | {c.get('scheduler', 'DDIMScheduler')} | {c['evals']:g} | "
                     f"{c['seconds']:.3f} | {ratio} |")
        prev = c
    lines += ["", f"Guidance at w = 2, {g_steps} steps: teacher CFG {cfg_cost[0]:g} evaluations / image, "
                  f"{cfg_cost[1]:.3f} s; guided student {emb_cost[0]:g} evaluations / image, {emb_cost[1]:.3f} s "
                  f"(ratio {emb_cost[1] / cfg_cost[1]:.2f} in time, {emb_cost[0] / cfg_cost[0]:.2f} in evaluations).", ""]
    Path(args.results).write_text("\n".join(lines))
    plot(prog_rows, teacher_fid, Path(args.results).parent / "progressive_fid.png")
    (out / "bench.json").write_text(json.dumps({"progressive": prog_rows, "teacher": t_rows, "guidance": guid_rows,
                                                "guidance_teacher": [list(k) + [v] for k, v in g_teacher.items()],
                                                "cost": cost, "cfg_cost": cfg_cost, "embedded_cost": emb_cost},
                                               indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
