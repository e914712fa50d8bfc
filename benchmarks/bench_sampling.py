"""End-to-end sampling speed: 1-, 2- and 4-step student pipelines against the teacher's 25- and 50-step
sampler, same batch and resolution, each through its own diffusers pipeline call (noise, text encoding
where there is text, every network call, the VAE decode, the conversion to numpy).

  python benchmarks/bench_sampling.py                           # digits teacher + tiny SD1.5, CPU
  python benchmarks/bench_sampling.py --worlds sd15 --batch 4   # on CUDA when visible (--device)

The teacher samples with its own scheduler and classifier-free guidance (--guidance, one doubled batch
per step, as its users run it); the students are copies of the teacher's network (distilled students
have its architecture; speed does not depend on the weights) under LCMScheduler at guidance 1, as a
consistency student with the teacher's guidance baked in is sampled. Prints a table of seconds per
batch (best of --reps after one warm-up call) and each row's speed-up over the teacher at 50 steps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TEACHER_STEPS = (50, 25)
STUDENT_STEPS = (1, 2, 4)


def digits_world(device):
    """The embedded digits teacher (class-conditional 8x8, VP v-prediction) and its conditions."""
    from stepdistill.teacher import load_teacher

    teacher = load_teacher(str(ROOT / "samples" / "digits-teacher"))
    return teacher, lambda n: {"class_labels": list(range(n))}


def sd15_world(device):
    """A small SD1.5-shaped pipeline built offline (tests/tiny_models.py: CLIP, VAE, 7M-parameter UNet)."""
    import tiny_models as tm
    from stepdistill.teacher import load_teacher

    tmp = Path(tempfile.mkdtemp())
    path = tm.save_sd15_teacher(tmp / "sd15", unet=tm.small_sd15_unet())
    teacher = load_teacher(str(path))
    return teacher, lambda n: {"prompt": ["a photograph of a digit"] * n}


WORLDS = {"digits": digits_world, "sd15": sd15_world}


def student_pipeline(teacher, steps: int):
    from diffusers import LCMScheduler

    from stepdistill.export import teacher_pipeline_with

    scheduler = LCMScheduler.from_config(teacher.pipeline.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    student = copy.deepcopy(teacher.model)
    return teacher_pipeline_with(teacher, student, scheduler, steps)


def seconds(call, reps: int, device: str) -> float:
    call()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def run_world(name: str, batch: int, reps: int, guidance: float, device: str) -> list[dict]:
    from stepdistill.sampling import pipeline_images

    teacher, conditions = WORLDS[name](device)
    teacher.to(device)
    cond = conditions(batch)
    rows = []

    def timed(pipe, steps, w):
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator(device).manual_seed(0)
        with torch.inference_mode():
            s = seconds(lambda: pipeline_images(pipe, batch, steps, generator=gen, guidance=w, conditions=cond),
                        reps, device)
        return s

    for steps in TEACHER_STEPS:
        rows.append({"world": name, "sampler": f"teacher {type(teacher.pipeline.scheduler).__name__}, CFG {guidance}",
                     "steps": steps, "s": timed(teacher.pipeline, steps, guidance)})
    for steps in STUDENT_STEPS:
        pipe = student_pipeline(teacher, steps).to(device)
        rows.append({"world": name, "sampler": "student LCMScheduler, guidance 1", "steps": steps,
                     "s": timed(pipe, steps, 1.0)})
    base50 = rows[0]["s"]
    base25 = rows[1]["s"]
    for r in rows:
        r["vs50"] = base50 / r["s"]
        r["vs25"] = base25 / r["s"]
    shape = tuple(teacher.sample_shape)
    print(f"\n{name}: batch {batch}, model-space sample {shape}, device {device}, best of {reps}")
    print("| sampler | steps | s / batch | speed-up vs teacher 50 | vs teacher 25 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['s']:.4f} | {r['vs50']:.1f}x | {r['vs25']:.1f}x |")
    sys.stdout.flush()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=3.0, help="the teacher's CFG scale (a doubled batch per step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.worlds:
        run_world(name, args.batch, args.reps, args.guidance, args.device)


if __name__ == "__main__":
    main()
