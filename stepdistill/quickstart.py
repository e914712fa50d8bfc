"""The embedded default end to end: distil the digits teacher, export, sample, and print a quality table.

Each method's run uses training_configs/digits/<config>.yaml. The table compares the student at
its step counts with the teacher's DDIM (trailing spacing, x0 clipped to the data range) at the
same steps and at 50, as a Frechet distance in the digits classifier's features.
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
from .runner import run, student_dir
from .teacher import load_teacher

# method name -> config file under training_configs/digits/
QUICKSTART_CONFIGS = {
    "cd": "consistency.yaml",
    "lcm": "lcm.yaml",
    "tcd": "tcd.yaml",
    "pcm": "pcm.yaml",
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


def teacher_rows(teacher, fid: DigitsFID, num_samples: int, seed: int, cache: Path) -> list[dict]:
    """The teacher's DDIM at 1, 2, 4 and 50 steps (cached per teacher weights, sample count and seed)."""
    key = _teacher_key(Path(teacher.source), num_samples, seed)
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["rows"]
    rows = []
    params = param_count(teacher.model)
    for steps in TEACHER_STEPS:
        grid = teacher.denoiser.schedule.sampling_grid(steps, "trailing")
        images = generate(lambda z, c, g: solvers.sample(teacher.denoiser, z, grid, c, clip_x0=1.0),
                          num_samples, teacher.sample_shape, lambda b: teacher.conditioner.encode(b, "cpu"),
                          seed=seed)
        rows.append({"model": "teacher", "sampler": "ddim", "steps": steps, "fid": fid(images), "params": params})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "rows": rows}, indent=1))
    return rows


def student_rows(trainer, fid: DigitsFID, num_samples: int, seed: int) -> list[dict]:
    d = trainer.distiller
    model = trainer.export_module()
    rows = []
    for steps in trainer.cfg.export.steps:
        images = generate(lambda z, c, g: d.sample(z, c, steps, generator=g, model=model), num_samples,
                          d.teacher_info.sample_shape, lambda b: d.teacher_info.conditioner.encode(b, d.device),
                          device=d.device, seed=seed)
        rows.append({"model": d.name, "sampler": d.sampler_name, "steps": steps, "fid": fid(images),
                     "params": param_count(d.student)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<14}{'sampler':<16}{'steps':>6}{'FID':>10}{'params':>12}"]
    for r in rows:
        lines.append(f"{r['model']:<14}{r['sampler']:<16}{r['steps']:>6}{r['fid']:>10.2f}{r['params']:>12,}")
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
        trainer = run(cfg)
        train_s = time.perf_counter() - start
        method_rows = student_rows(trainer, fid, num_samples, seed)
        update_card_metrics(student_dir(cfg), method_rows)
        rows.extend(method_rows)
        print(f"{method}: trained in {train_s:.0f} s, evaluated in {time.perf_counter() - start - train_s:.0f} s; "
              f"student in {student_dir(cfg)}", flush=True)
    teacher = load_teacher(str(DIGITS_TEACHER))
    rows = teacher_rows(teacher, fid, num_samples, seed, out / "teacher_rows.json") + rows
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nFrechet distance in the digits classifier's features ({num_samples} samples vs 1,797 real digits; "
          "lower is better)")
    print(format_table(rows))
    print(f"\nresults: {out / 'results.json'}")
    return rows
