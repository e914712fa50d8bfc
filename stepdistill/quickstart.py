"""The embedded default end to end: distil the digits teacher, export, sample, and print a quality table.

Each method's run uses training_configs/digits/<Distiller.quickstart_config>; a method that trains in several
runs (progressive rounds) gets rows for every run's student. Students are sampled through their exported
pipelines, as a user loads them. The table compares each student at its
step counts (and guidance scales, for guidance-conditioned students) with the teacher's DDIM
(trailing spacing, x0 clipped to the data range, CFG at the same scale) at the same steps and at
1, 2, 4 and 50 steps, as a Frechet distance in the digits classifier's features. With the flow-matching
teacher (`--teacher flow`) the baseline is its flow-matching Euler on its scheduler's grid, unclipped, as
its FlowMatchEulerDiscreteScheduler pipeline samples; methods without flow-teacher support are skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .config import load_config
from .distillers import REGISTRY, available_methods
from .distillers.common import parameter_count
from .errors import ConfigError
from .eval.quality import DigitsFID, generate
from .export import update_card_metrics
from .paths import CONFIGS, DIGITS_FLOW_TEACHER, DIGITS_TEACHER
from .runner import build, run_stages
from .samplers import sample_ode
from .schedules import FlowSchedule
from .sampling import pipeline_images
from .teacher import load_pipeline, load_teacher

TEACHER_STEPS = (1, 2, 4, 50)
TEACHERS = {"vp": DIGITS_TEACHER, "flow": DIGITS_FLOW_TEACHER}


def quickstart_configs() -> dict[str, str]:
    """Method name -> its config under training_configs/digits/, for every registered method that has one."""
    available = set(available_methods())
    return {name: cls.quickstart_config for name, cls in REGISTRY.items() if name in available and cls.quickstart_config}


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
    params = parameter_count(teacher.model)
    flow = isinstance(teacher.denoiser.schedule, FlowSchedule)
    for steps, w in points:
        if (steps, w) in known:
            continue
        grid = teacher.denoiser.schedule.sampling_grid(steps, "trailing")
        encode = teacher.conditioner.encode
        images = generate(lambda z, labels, g: sample_ode(
            teacher.denoiser, z, grid, {"cond": encode({"class_labels": labels}, "cpu"), "guidance": w},
            solver="euler" if flow else "ddim", clip_x0=None if flow else 1.0),
            num_samples, teacher.sample_shape, seed=seed)
        row = {"model": "teacher", "sampler": "euler" if flow else "ddim", "steps": steps, "fid": fid(images),
               "params": params}
        if w != 1.0:
            row["guidance"] = w
        known[(steps, w)] = row
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "rows": list(known.values())}, indent=1))
    return [known[p] for p in points]


def stage_rows(stage, fid: DigitsFID, num_samples: int, seed: int, model_name: str) -> list[dict]:
    """One stage's exported student, sampled through its pipeline at its export.steps and at each guidance scale
    its method evaluates, and each milestone student (Distiller.milestones) at its own steps, marked with its
    folder as "run"."""
    cfg = stage.config
    _, d, _ = build(cfg)
    exports = [(stage.student_dir, cfg.export.steps, None)]
    exports += [(Path(cfg.output_dir) / folder, [steps], folder) for _, folder, steps in d.milestones()]
    rows = []
    for folder, step_counts, run_name in exports:
        pipe = load_pipeline(str(folder)).to(d.device)
        pipe.set_progress_bar_config(disable=True)
        network = getattr(pipe, d.teacher_info.model_key)
        these = []
        for steps in step_counts:
            for w in d.eval_guidance_scales():
                images = generate(lambda z, labels, g: pipeline_images(
                    pipe, len(z), steps, generator=g, guidance=w, conditions={"class_labels": labels}, latents=z,
                    **d.pipeline_kwargs()), num_samples, d.teacher_info.sample_shape, device=d.device, seed=seed)
                row = {"model": model_name, "sampler": d.sampler_name, "steps": steps, "fid": fid(images),
                       "params": parameter_count(network)}
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
               overrides: list[str] | None = None, teacher: str = "vp") -> list[dict]:
    """Run each method on the digits world (the vp or the flow teacher) and write results.json; returns its
    records. On the flow teacher, methods that do not support flow teachers are skipped with their reason."""
    configs = quickstart_configs()
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise ConfigError(f"quickstart has no method {unknown[0]!r}; choose from {', '.join(configs)} or all")
    if teacher not in TEACHERS:
        raise ConfigError(f"quickstart has no teacher {teacher!r}; choose from {', '.join(TEACHERS)}")
    teacher_dir = TEACHERS[teacher]
    if not teacher_dir.is_dir():
        raise ConfigError(f"the {teacher} digits teacher is not in {teacher_dir}; train it with "
                          f"`python scripts/train_teacher.py --kind {teacher}`")
    if teacher == "flow":
        for m in [m for m in methods if not REGISTRY[m].supports_flow_teacher]:
            print(f"{m}: skipped on the flow teacher: {REGISTRY[m].flow_teacher_reason}", flush=True)
        methods = [m for m in methods if REGISTRY[m].supports_flow_teacher]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fid = DigitsFID()
    rows = []
    for method in methods:
        start = time.perf_counter()
        cfg = load_config(CONFIGS / "digits" / configs[method],
                          [f"output_dir={out / method}", f"teacher={teacher_dir}", *(overrides or [])])
        stages = [st for st in run_stages(cfg) if st.student_dir is not None and st.config is not None]
        train_s = time.perf_counter() - start
        for stage in stages:  # a multi-run method (progressive rounds) gets rows for every run's student
            rows_ = stage_rows(stage, fid, num_samples, seed, method)
            if len(stages) > 1:
                for r in rows_:
                    r["run"] = str(Path(stage.output_dir).relative_to(out / method))
            rows.extend(rows_)
        print(f"{method}: trained in {train_s:.0f} s, evaluated in {time.perf_counter() - start - train_s:.0f} s; "
              f"student in {stages[-1].student_dir}, sample grids in {stages[-1].output_dir / 'samples'}",
              flush=True)
    teacher = load_teacher(str(teacher_dir))
    # the teacher at 1/2/4/50 steps, and at every (steps, guidance) a student was measured at
    points = [(s, None) for s in TEACHER_STEPS] + [(r["steps"], r.get("guidance")) for r in rows]
    rows = teacher_rows(teacher, fid, num_samples, seed, out / "teacher_rows.json", points) + rows
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nFrechet distance in the digits classifier's features ({num_samples} samples vs 1,797 real digits; "
          "lower is better)")
    print(format_table(rows))
    print(f"\nresults: {out / 'results.json'}")
    return rows
