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


def sample_pipeline_grid(pipeline_dir, steps=None, num=16, out=None, seed=0, guidance=None, classes=None,
                         prompts=None) -> Path:
    pipeline_dir = Path(pipeline_dir)
    pipe = load_pipeline(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    steps = steps or default_steps(pipe, pipeline_dir)
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"num_inference_steps": steps, "generator": generator, "output_type": "np"}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if isinstance(pipe, ClassConditionalPipeline):
        labels = classes if classes else [i % pipe.config.num_classes for i in range(num)]
        images = pipe(class_labels=labels, **kwargs).images
    elif getattr(pipe, "text_encoder", None) is not None:
        prompts = prompts or ["a photograph"]
        images = pipe(prompt=[prompts[i % len(prompts)] for i in range(num)], **kwargs).images
    else:
        images = pipe(batch_size=num, **kwargs).images
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2 - 1
    return save_grid(x, out or pipeline_dir / f"grid-{steps}step.png")
