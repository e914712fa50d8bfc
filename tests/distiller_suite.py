"""One test class every distiller passes: it builds, trains a few steps with finite loss,
checkpoints, resumes, exports, and the export loads and samples.

A method's test file subclasses DistillerSuite and sets `config_file` (a real file under
training_configs/) and, if needed, `teacher` (the fixture name) and `overrides`; overrides that
need other fixtures (a data folder) come from the `extra_overrides(request)` hook.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runner import run
from stepdistill.teacher import load_pipeline
from stepdistill.training import checkpoint as ckpt


class DistillerSuite:
    config_file: str = ""
    teacher: str = "class_teacher"
    overrides: tuple = ()

    @classmethod
    def extra_overrides(cls, request) -> list[str]:
        return []

    @pytest.fixture(scope="class")
    @classmethod
    def finished(cls, request, tmp_path_factory):
        teacher = request.getfixturevalue(cls.teacher)
        out = tmp_path_factory.mktemp(cls.config_file.replace("/", "-"))
        cfg = tiny_config(cls.config_file, teacher, out, "train.max_steps=2", "train.checkpoint_every=1",
                          "train.keep_checkpoints=3", *cls.overrides, *cls.extra_overrides(request))
        return cfg, run(cfg)

    def test_trains_with_finite_losses(self, finished):
        _, trainer = finished
        losses = {k: v for k, v in trainer.logs.items() if k.startswith("loss/")}
        assert losses and all(math.isfinite(v) for v in losses.values())

    def test_checkpoints_and_resumes(self, finished):
        cfg, _ = finished
        root = ckpt.latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
        assert root is not None and root.name == "step-00000002"
        cfg.train.max_steps = 3
        resumed = run(cfg)
        assert resumed.step == 3

    def test_export_loads_and_samples(self, finished):
        cfg, trainer = finished
        pipe = load_pipeline(str(Path(cfg.output_dir) / "student"))
        steps = cfg.export.steps[0]
        g = torch.Generator().manual_seed(0)
        if isinstance(pipe, ClassConditionalPipeline):
            images = pipe(class_labels=[1, 2], num_inference_steps=steps, generator=g, output_type="np").images
        elif getattr(pipe, "text_encoder", None) is not None:
            images = pipe(prompt=["a red cat"] * 2, num_inference_steps=steps, generator=g, output_type="np",
                          guidance_scale=1.0).images
        else:
            images = pipe(batch_size=2, num_inference_steps=steps, generator=g, output_type="np").images
        assert images.shape[0] == 2 and (images >= 0).all() and (images <= 1).all()

    def test_own_sampler_gives_finite_images(self, finished):
        _, trainer = finished
        d = trainer.distiller
        noise = torch.randn(2, *d.teacher_info.sample_shape)
        cond = d.teacher_info.conditioner.encode(d.teacher_info.conditioner.example_conditions(2), d.device)
        for steps in trainer.cfg.export.steps:
            x = d.sample(noise, cond, steps, generator=torch.Generator().manual_seed(0))
            assert x.shape == noise.shape and torch.isfinite(x).all()
