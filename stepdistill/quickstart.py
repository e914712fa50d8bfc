"""The embedded default end to end: distil the digits teacher, export, sample, and print a quality table.

Each method's run uses training_configs/digits/<config>.yaml; a method that trains in several runs
(progressive rounds) gets rows for every run's student. The table compares each student at its
step counts (and guidance scales, for guidance-conditioned students) with the teacher's DDIM
(trailing spacing, x0 clipped to the data range, CFG at the same scale) at the same steps and at
1, 2, 4 and 50 steps, as a Frechet distance in the digits classifier's features.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from . import solvers
from .config import load_config
from .errors import ConfigError
from .eval.quality import DigitsFID, generate
from .export import update_card_metrics
from .paths import CONFIGS, DIGITS_TEACHER
from .runner import build, run_stages, student_dir
from .teacher import load_pipeline, load_teacher

# method name -> config file under training_configs/digits/
QUICKSTART_CONFIGS = {
    "cd": "consistency.yaml",
    "lcm": "lcm.yaml",
    "tcd": "tcd.yaml",
    "pcm": "pcm.yaml",
    "progressive": "progressive.yaml",
    "guidance": "guidance.yaml",
}
TEACHER_STEPS = (1, 2, 4, 50)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _teacher_key(teacher_dir: Path, num_samples: int, seed: int) -> str:
    h = hashlib.sha256()
    for f in sorted(teacher_dir.rglob("*.safetensors")):
        h.update(f.read_bytes())
    h.update(f"{num_samples}-{seed}-fid:torch-fidelity-uint8".encode())  # rows measured the current way
    return h.hexdigest()[:16]


def _point(steps: int, guidance) -> tuple[int, float]:
    """A (steps, guidance scale) evaluation point; no guidance is scale 1."""
    return int(steps), 1.0 if guidance is None else float(guidance)


def teacher_rows(teacher, fid: DigitsFID, num_samples: int, seed: int, cache: Path,
                 points: list[tuple[int, float | None]] | None = None) -> list[dict]:
    """The teacher's DDIM (with CFG where a guidance scale is given) at each (steps, guidance) point;
    default: 1, 2, 4 and 50 steps unguided. Rows are cached per teacher weights, sample count and seed."""
    points = list(dict.fromkeys(_point(*p) for p in (points or [(s, None) for s in TEACHER_STEPS])))
    key = _teacher_key(Path(teacher.source), num_samples, seed)
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    known = {_point(r["steps"], r.get("guidance")): r for r in stored.get("rows", [])} if stored.get("key") == key else {}
    params = param_count(teacher.model)
    for steps, w in points:
        if (steps, w) in known:
            continue
        grid = teacher.denoiser.schedule.sampling_grid(steps, "trailing")
        images = generate(lambda z, c, g: solvers.sample(teacher.denoiser, z, grid, c, guidance=w, clip_x0=1.0),
                          num_samples, teacher.sample_shape, lambda b: teacher.conditioner.encode(b, "cpu"),
                          seed=seed)
        row = {"model": "teacher", "sampler": "ddim", "steps": steps, "fid": fid(images), "params": params}
        if w != 1.0:
            row["guidance"] = w
        known[(steps, w)] = row
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "rows": list(known.values())}, indent=1))
    return [known[p] for p in points]


def stage_rows(cfg, fid: DigitsFID, num_samples: int, seed: int, model_name: str) -> list[dict]:
    """One run's exported student at its export.steps and at each guidance scale its method evaluates, and
    each milestone student (Distiller.milestones) at its own steps, marked with its folder as "run"."""
    _, d, _ = build(cfg)
    exports = [(student_dir(cfg), cfg.export.steps, None)]
    exports += [(Path(cfg.output_dir) / folder, [steps], folder) for _, folder, steps in d.milestones()]
    rows = []
    for folder, step_counts, run_name in exports:
        network = getattr(load_pipeline(str(folder)), d.teacher_info.model_key).to(d.device).eval()
        these = []
        for steps in step_counts:
            for w in d.eval_guidance_scales():
                kwargs = {} if w is None else {"guidance_scale": w}
                images = generate(lambda z, c, g: d.sample(z, c, steps, generator=g, model=network, **kwargs),
                                  num_samples, d.teacher_info.sample_shape,
                                  lambda b: d.teacher_info.conditioner.encode(b, d.device), device=d.device, seed=seed)
                row = {"model": model_name, "sampler": d.sampler_name, "steps": steps, "fid": fid(images),
                       "params": param_count(network)}
                if w is not None:
                    row["guidance"] = w
                if run_name is not None:
                    row["run"] = run_name
                these.append(row)
        update_card_metrics(folder, these)
        rows.extend(these)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a text table; a row from a milestone student names its folder after the model."""
    lines = [f"{'model':<24}{'sampler':<16}{'steps':>6}{'w':>6}{'FID':>10}{'params':>12}"]
    for r in rows:
        w = f"{r['guidance']:g}" if "guidance" in r else "-"
        model = f"{r['model']} ({r['run']})" if r.get("run", "").startswith("student-") else r["model"]
        lines.append(f"{model:<24}{r['sampler']:<16}{r['steps']:>6}{w:>6}{r['fid']:>10.2f}{r['params']:>12,}")
    return "\n".join(lines)


def quickstart(methods: list[str], output_dir: str | Path, num_samples: int = 1000, seed: int = 0,
               overrides: list[str] | None = None) -> list[dict]:
    """Run each method on the digits world and write results.json; returns its records."""
    unknown = [m for m in methods if m not in QUICKSTART_CONFIGS]
    if unknown:
        raise ConfigError(f"quickstart has no method {unknown[0]!r}; choose from {', '.join(QUICKSTART_CONFIGS)} or all")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fid = DigitsFID()
    rows = []
    for method in methods:
        start = time.perf_counter()
        cfg = load_config(CONFIGS / "digits" / QUICKSTART_CONFIGS[method],
                          [f"output_dir={out / method}", f"teacher={DIGITS_TEACHER}", *(overrides or [])])
        stages = run_stages(cfg)
        train_s = time.perf_counter() - start
        for stage in stages:  # a multi-run method (progressive rounds) gets rows for every run's student
            stage_rows_ = stage_rows(stage, fid, num_samples, seed, method)
            if len(stages) > 1:
                for r in stage_rows_:
                    r["run"] = str(Path(stage.output_dir).relative_to(out / method))
            rows.extend(stage_rows_)
        print(f"{method}: trained in {train_s:.0f} s, evaluated in {time.perf_counter() - start - train_s:.0f} s; "
              f"student in {student_dir(stages[-1])}, sample grids in {Path(stages[-1].output_dir) / 'samples'}",
              flush=True)
    teacher = load_teacher(str(DIGITS_TEACHER))
    # the teacher at 1/2/4/50 steps, and at every (steps, guidance) a student was measured at
    points = [(s, None) for s in TEACHER_STEPS] + [(r["steps"], r.get("guidance")) for r in rows]
    rows = teacher_rows(teacher, fid, num_samples, seed, out / "teacher_rows.json", points) + rows
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nFrechet distance in the digits classifier's features ({num_samples} samples vs 1,797 real digits; "
          "lower is better)")
    print(format_table(rows))
    print(f"\nresults: {out / 'results.json'}")
    return rows
