"""Sample any exported pipeline into a PNG grid (`stepdistill sample`)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

from .errors import StepdistillError
from .export import CARD_FILE
from .pipelines import ClassConditionalPipeline
from .teacher import load_pipeline
from .training.grid import save_grid


def default_steps(pipe, pipeline_dir: Path) -> int:
    if isinstance(pipe, ClassConditionalPipeline):
        return pipe.config.default_steps
    card = pipeline_dir / CARD_FILE
    return json.loads(card.read_text())["steps"] if card.is_file() else 50


def pipeline_kind(pipe) -> str:
    """'class', 'text' or 'unconditional': which conditions a pipeline's __call__ takes."""
    if isinstance(pipe, ClassConditionalPipeline):
        return "class"
    if getattr(pipe, "text_encoder", None) is not None:
        return "text"
    return "unconditional"


def pipeline_conditions(pipe, start: int, num: int, classes=None, prompts=None) -> dict:
    """The raw conditions of samples start .. start+num-1: classes[i % len] or prompts[i % len] (defaults: every
    class in turn, one generic prompt), as the pipeline's __call__ takes them."""
    kind = pipeline_kind(pipe)
    index = range(start, start + num)
    if kind == "class":
        classes = classes if classes else list(range(pipe.config.num_classes))
        return {"class_labels": [classes[i % len(classes)] for i in index]}
    if kind == "text":
        prompts = prompts or ["a photograph"]
        return {"prompt": [prompts[i % len(prompts)] for i in index]}
    return {}


def pipeline_images(pipe, num: int, steps: int, generator=None, guidance=None, conditions: dict | None = None,
                    latents: torch.Tensor | None = None, **call_kwargs) -> torch.Tensor:
    """`num` samples of a pipeline as (N, C, H, W) in [-1, 1], through its own __call__.

    `conditions` are raw (class_labels or prompt lists, as a data batch holds them); `latents` is the
    starting noise where the pipeline takes one (DDPMPipeline draws it from `generator`); `generator` may
    be one generator or one per sample."""
    kwargs = {"num_inference_steps": steps, "generator": generator, "output_type": "np", **call_kwargs}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if latents is not None and "latents" in inspect.signature(pipe.__call__).parameters:
        kwargs["latents"] = latents
    conditions = dict(conditions or {})
    if "class_labels" in conditions:
        conditions["class_labels"] = torch.as_tensor(conditions["class_labels"]).reshape(-1).tolist()
    if not conditions:
        conditions = {"batch_size": num}
    images = pipe(**conditions, **kwargs).images
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2 - 1


def sample_pipeline_grid(pipeline_dir, steps=None, num=16, out=None, seed=0, guidance=None, classes=None,
                         prompts=None) -> Path:
    if (steps is not None and steps < 1) or num < 1:
        raise StepdistillError(f"--steps {steps} --num {num}: sampling needs at least 1 step and 1 image")
    pipeline_dir = Path(pipeline_dir)
    pipe = load_pipeline(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    if guidance is not None and guidance != 1.0 and (
            pipeline_kind(pipe) == "unconditional" or "guidance_scale" not in inspect.signature(pipe.__call__).parameters):
        raise StepdistillError(f"--guidance {guidance} needs a conditional pipeline with a null condition "
                               f"(classifier-free guidance); {pipeline_dir} is {pipeline_kind(pipe)}: leave --guidance out")
    steps = steps or default_steps(pipe, pipeline_dir)
    generator = torch.Generator().manual_seed(seed)
    if classes and pipeline_kind(pipe) == "class":
        num = len(classes)  # one image per given label
    x = pipeline_images(pipe, num, steps, generator, guidance, pipeline_conditions(pipe, 0, num, classes, prompts))
    return save_grid(x, out or pipeline_dir / f"grid-{steps}step.png")
