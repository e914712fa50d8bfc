"""Write a student as a diffusers pipeline directory (safetensors) with a scheduler and a model card."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

from torch import nn

from . import __version__
from .files import safe_child
from .lora import has_lora, merged_copy, save_lora
from .pipelines import ClassConditionalPipeline

CARD_FILE = "stepdistill.json"
LORA_DIR = "lora"  # a LoRA student's adapters, beside the merged pipeline


def teacher_pipeline_with(teacher, student: nn.Module, scheduler, steps: int):
    """The teacher's pipeline with the student network and a scheduler for `steps` steps."""
    pipe = teacher.pipeline
    if isinstance(pipe, ClassConditionalPipeline):
        return ClassConditionalPipeline(unet=student, scheduler=scheduler, null_class=pipe.config.null_class,
                                        num_classes=pipe.config.num_classes, default_steps=steps)
    components = dict(pipe.components)
    components[teacher.model_key] = student
    components["scheduler"] = scheduler
    return type(pipe)(**components)


def saveable(network: nn.Module, dtype) -> nn.Module:
    """The network as written: LoRA adapters merged, in the teacher's dtype (a copy only when either changes it)."""
    if has_lora(network):
        network = merged_copy(network)
    elif next(network.parameters()).dtype != dtype:
        network = copy.deepcopy(network)
    return network.to(dtype)


def model_card_text(card: dict) -> str:
    rows = "\n".join(f"| {r.get('sampler', '')} | {r['steps']} | {r['fid']:.2f} |" for r in card.get("metrics", [])
                     if r.get("fid") is not None)
    table = f"\n## Quality\n\n| sampler | steps | FID |\n|---|---|---|\n{rows}\n" if rows else ""
    paper = card.get("paper") or {}
    cite = f"[{paper.get('title')}](https://arxiv.org/abs/{paper.get('arxiv')})" if paper else card["method"]
    load = card["load"]
    return f"""---
library_name: diffusers
tags: [stepdistill, distillation, {card['method']}]
---
# {card['method']} student of `{card['teacher']}`

Distilled with [stepdistill](https://github.com/) {card['stepdistill_version']} by {cite}.
It samples in **{card['steps']} step(s)** with `{card['scheduler']}`.

```python
{load}
```
{table}
The full training config is in `{CARD_FILE}`.
"""


def load_snippet(pipe, steps: int, lora: bool = False, lora_only: bool = False, scheduler: str = "") -> str:
    name = type(pipe).__name__
    if lora:
        where = "PATH" if lora_only else f"PATH/{LORA_DIR}"
        home = "stepdistill" if isinstance(pipe, ClassConditionalPipeline) else "diffusers"
        return (f"from diffusers import {scheduler}\nfrom {home} import {name}\n"
                f"pipe = {name}.from_pretrained(TEACHER)\n"
                f"pipe.scheduler = {scheduler}.from_pretrained(\"PATH\", subfolder=\"scheduler\")\n"
                f"pipe.load_lora_weights(\"{where}\")\n"
                "pipe.fuse_lora()  # optional: merge the adapters\n"
                f"images = pipe(..., num_inference_steps={steps}, guidance_scale=1.0).images")
    if isinstance(pipe, ClassConditionalPipeline):
        return ("from stepdistill import ClassConditionalPipeline\n"
                "pipe = ClassConditionalPipeline.from_pretrained(PATH)\n"
                f"images = pipe(class_labels=[0, 1, 2], num_inference_steps={steps}).images")
    return ("from diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained(PATH)  # {name}\n"
            f"images = pipe(num_inference_steps={steps}).images")


def export_student(distiller, out_dir: str | Path, steps: int, networks: dict[str, nn.Module] | None = None,
                   config: dict | None = None, metrics: list | None = None, lora_only: bool = False) -> Path:
    """Save the exported networks (default: the live ones; e.g. EMA shadows) as a loadable pipeline directory.

    The distiller builds the pipeline (Distiller.build_pipeline). A LoRA student is written twice: its adapters
    in `lora/` (diffusers' `load_lora_weights` format, for the teacher pipeline) and merged into the network as
    a whole pipeline; with `lora_only`, the adapters and the scheduler alone go to `out_dir`."""
    out_dir = Path(out_dir)
    teacher = distiller.teacher_info
    networks = distiller.networks_or_live(networks)
    for name in networks:  # component folders are named after networks: none may point outside out_dir
        safe_child(out_dir, name, "exported network")
    scheduler = distiller.export_scheduler(steps)
    student = networks.get("student")
    lora = student is not None and has_lora(student)
    if lora:
        save_lora(type(teacher.pipeline), teacher.model_key, student, out_dir if lora_only else out_dir / LORA_DIR)
    if lora and lora_only:
        scheduler.save_pretrained(out_dir / "scheduler")
        pipe = teacher.pipeline
    else:
        dtype = next(teacher.model.parameters()).dtype
        pipe = distiller.build_pipeline({k: saveable(v, dtype) for k, v in networks.items()}, steps)
        for name in pipe.components:
            safe_child(out_dir, name, "pipeline component")
        pipe.save_pretrained(out_dir, safe_serialization=True)
    card = {
        "method": distiller.name,
        "paper": distiller.paper,
        "teacher": teacher.source,
        "teacher_pipeline": teacher.pipeline_class,
        "steps": steps,
        "scheduler": type(scheduler).__name__,
        "stepdistill_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load": load_snippet(pipe, steps, lora=lora, lora_only=lora_only, scheduler=type(scheduler).__name__),
        "config": config or {},
        "metrics": metrics or [],
        **distiller.model_card(),
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    (out_dir / "README.md").write_text(model_card_text(card))
    return out_dir


def update_card_metrics(out_dir: str | Path, metrics: list) -> None:
    """Add measured quality rows to an exported student's card."""
    out_dir = Path(out_dir)
    card = json.loads((out_dir / CARD_FILE).read_text())
    card["metrics"] = metrics
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    (out_dir / "README.md").write_text(model_card_text(card))
