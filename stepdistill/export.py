"""Write a student as a diffusers pipeline directory (safetensors) with a scheduler and a model card."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

from diffusers import DDIMScheduler, EulerDiscreteScheduler
from torch import nn

from . import __version__
from .files import safe_child
from .lora import has_lora, merged_copy, save_lora
from .pipelines import ClassConditionalPipeline, FlowGridScheduler
from .schedules import FlowSchedule

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


# pipelines whose loop feeds the scheduler's raw sample to the network (no scale_model_input /
# init_noise_sigma), so only VP-space schedulers (DDIM) sample them correctly
VP_SPACE_PIPELINES = ("DDPMPipeline", "DDIMPipeline")


def data_clip(teacher_info) -> float | None:
    """x0 clipping to the data range where the teacher's scheduler clips (pixel teachers; never latents)."""
    cfg = teacher_info.pipeline.scheduler.config
    if teacher_info.codec.latent or not cfg.get("clip_sample", False):
        return None
    return float(cfg.get("clip_sample_range", 1.0))


def grid_scheduler(teacher_info, prediction_type: str, steps: int, clip: bool = True):
    """A diffusers scheduler whose `steps`-step loop is exactly DDIM on the student grid: the VP 'trailing' grid
    ending at the clean end, or a flow teacher's shift(k / steps) grid (`FlowSchedule.sampling_grid(.., 'shifted')`).

    DDIMScheduler (trailing) steps by T // N, which lands on the next grid point only when N divides
    T; otherwise EulerDiscreteScheduler (trailing, final sigma 0) does the same deterministic update in
    sigma = s / a coordinates and lands exactly (at K = 3: 999 -> 666 -> 332 -> 0, where DDIM goes 666 -> 333).
    Pipelines that skip scale_model_input (DDPMPipeline) keep DDIM, which is then within one training timestep of
    the grid. Flow teachers get FlowGridScheduler (flow Euler on the shifted grid). With `clip`, DDIM clips x0 to the
    data range as the teacher's scheduler does (`data_clip`); Euler cannot clip. steps_offset is unused by
    'trailing' spacing; it is 1 because StableDiffusionPipeline rewrites (and warns about) any other value.
    """
    cfg = teacher_info.pipeline.scheduler.config
    schedule = teacher_info.denoiser.schedule
    if isinstance(schedule, FlowSchedule):
        return FlowGridScheduler.from_config(cfg)
    exact_ddim = schedule.num_train_timesteps % steps == 0
    if exact_ddim or teacher_info.pipeline_class in VP_SPACE_PIPELINES:
        limit = data_clip(teacher_info) if clip else None
        return DDIMScheduler.from_config(cfg, timestep_spacing="trailing", prediction_type=prediction_type,
                                         set_alpha_to_one=True, steps_offset=1, clip_sample=limit is not None,
                                         clip_sample_range=limit or 1.0, thresholding=False)
    return EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing", prediction_type=prediction_type,
                                              final_sigmas_type="zero", interpolation_type="linear",
                                              use_karras_sigmas=False, timestep_type="discrete", steps_offset=1)


def sampler_clip(scheduler) -> float | None:
    """The x0 clipping an exported scheduler applies, which the student's own sampler then applies too."""
    cfg = scheduler.config
    return float(cfg.get("clip_sample_range", 1.0)) if isinstance(scheduler, DDIMScheduler) and cfg.get("clip_sample") else None


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
    notes = "".join(f"\n**{k.capitalize()}**: {card[k]}\n" for k in ("sampling", "guidance") if card.get(k))
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
{notes}{table}
The full training config is in `{CARD_FILE}`.
"""


def flow_grid_card(schedule: FlowSchedule, steps: int) -> str:
    """How plain diffusers samples a flow student on its trained shift(k / K) grid, for the model card."""
    grid = schedule.sampling_grid(steps, "shifted")
    sigmas = [round(v, 6) for v in schedule.unshifted(grid[:-1]).tolist()]
    return (f"trained on sigmas {[round(v, 4) for v in grid.tolist()]}: the exported FlowGridScheduler "
            f"(`from stepdistill import FlowGridScheduler`, loaded by from_pretrained while stepdistill is installed) "
            f"samples them at num_inference_steps={steps}; with diffusers' own FlowMatchEulerDiscreteScheduler pass "
            f"`sigmas={sigmas}` to the pipeline (it shifts them onto the grid; deterministic and consistency "
            f"sampling only)")


def _home(cls) -> str:
    return "stepdistill" if cls.__module__.startswith("stepdistill") else "diffusers"


def load_snippet(pipe, steps: int, lora: bool = False, lora_only: bool = False, scheduler: type | None = None) -> str:
    name = type(pipe).__name__
    if lora:
        where = "PATH" if lora_only else f"PATH/{LORA_DIR}"
        home = _home(type(pipe))
        return (f"from {_home(scheduler)} import {scheduler.__name__}\nfrom {home} import {name}\n"
                f"pipe = {name}.from_pretrained(TEACHER)\n"
                f"pipe.scheduler = {scheduler.__name__}.from_pretrained(\"PATH\", subfolder=\"scheduler\")\n"
                f"pipe.load_lora_weights(\"{where}\")\n"
                "pipe.fuse_lora()  # optional: merge the adapters\n"
                f"images = pipe(..., num_inference_steps={steps}, guidance_scale=1.0).images")
    if isinstance(pipe, ClassConditionalPipeline):
        return ("from stepdistill import ClassConditionalPipeline\n"
                "pipe = ClassConditionalPipeline.from_pretrained(PATH)\n"
                f"images = pipe(class_labels=[0, 1, 2], num_inference_steps={steps}).images")
    extra = "; its scheduler needs stepdistill installed" if scheduler is not None and _home(scheduler) == "stepdistill" else ""
    return ("from diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained(PATH)  # {name}{extra}\n"
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
    method_card = distiller.model_card()
    if isinstance(scheduler, FlowGridScheduler):
        method_card["sampling"] = "; ".join(filter(None, [method_card.get("sampling"),
                                                          flow_grid_card(distiller.teacher.schedule, steps)]))
    card = {
        "method": distiller.name,
        "paper": distiller.paper,
        "teacher": teacher.source,
        "teacher_pipeline": teacher.pipeline_class,
        "steps": steps,
        "scheduler": type(scheduler).__name__,
        "stepdistill_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load": load_snippet(pipe, steps, lora=lora, lora_only=lora_only, scheduler=type(scheduler)),
        "config": config or {},
        "metrics": metrics or [],
        **method_card,
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
