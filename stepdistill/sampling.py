"""Sample any exported pipeline into a PNG grid (`stepdistill sample`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

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


def pipeline_images(pipe, start: int, num: int, steps: int, generator=None, guidance=None, classes=None,
                    prompts=None) -> torch.Tensor:
    """Samples start .. start+num-1 as (N, C, H, W) in [-1, 1]; sample i gets classes[i % len] or prompts[i % len]."""
    kwargs = {"num_inference_steps": steps, "generator": generator, "output_type": "np"}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    kind = pipeline_kind(pipe)
    index = range(start, start + num)
    if kind == "class":
        classes = classes if classes else list(range(pipe.config.num_classes))
        images = pipe(class_labels=[classes[i % len(classes)] for i in index], **kwargs).images
    elif kind == "text":
        prompts = prompts or ["a photograph"]
        images = pipe(prompt=[prompts[i % len(prompts)] for i in index], **kwargs).images
    else:
        images = pipe(batch_size=num, **kwargs).images
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2 - 1


def sample_pipeline_grid(pipeline_dir, steps=None, num=16, out=None, seed=0, guidance=None, classes=None,
                         prompts=None) -> Path:
    pipeline_dir = Path(pipeline_dir)
    pipe = load_pipeline(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    steps = steps or default_steps(pipe, pipeline_dir)
    generator = torch.Generator().manual_seed(seed)
    if classes and pipeline_kind(pipe) == "class":
        num = len(classes)  # one image per given label
    x = pipeline_images(pipe, 0, num, steps, generator, guidance, classes, prompts)
    return save_grid(x, out or pipeline_dir / f"grid-{steps}step.png")
