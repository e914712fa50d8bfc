"""One test class every distiller passes: it builds, trains a few steps with finite loss, every trainable
network moves, a run killed after a checkpoint resumes to the uninterrupted run's weights, it exports, and
the export loads and samples.

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
from stepdistill.runner import build, run
from stepdistill.teacher import load_pipeline
from stepdistill.training import checkpoint as ckpt
from stepdistill.training.trainer import Trainer

STEPS = 3  # the suite's runs: killed after the step-2 checkpoint, resumed to step 3


class Killed(Exception):
    pass


def run_killed_then_resumed(cfg):
    """Run `cfg` to STEPS, killed right after its step-2 checkpoint, then resumed (train.resume=auto)."""
    original = Trainer.save_checkpoint

    def save_then_die(self):
        path = original(self)
        if self.step == STEPS - 1:
            raise Killed
        return path

    Trainer.save_checkpoint = save_then_die
    try:
        run(cfg)
    except Killed:
        pass
    finally:
        Trainer.save_checkpoint = original
    return run(cfg)


def network_states(trainer):
    return {f"{g}/{n}": p.detach().clone() for g, net in trainer.networks.items() for n, p in net.named_parameters()}


class DistillerSuite:
    config_file: str = ""
    teacher: str = "class_teacher"
    overrides: tuple = ()

    @classmethod
    def extra_overrides(cls, request) -> list[str]:
        return []

    @classmethod
    def config(cls, request, out, *extra):
        teacher = request.getfixturevalue(cls.teacher)
        return tiny_config(cls.config_file, teacher, out, f"train.max_steps={STEPS}", "train.checkpoint_every=1",
                           "train.keep_checkpoints=5", *cls.overrides, *cls.extra_overrides(request), *extra)

    @pytest.fixture(scope="class")
    @classmethod
    def finished(cls, request, tmp_path_factory):
        cfg = cls.config(request, tmp_path_factory.mktemp(cls.config_file.replace("/", "-")))
        return cfg, run_killed_then_resumed(cfg)

    def test_trains_with_finite_losses(self, finished):
        _, trainer = finished
        losses = {k: v for k, v in trainer.logs.items() if k.startswith("loss/")}
        assert losses and all(math.isfinite(v) for v in losses.values())

    def test_checkpoints_and_resumes_to_the_uninterrupted_weights(self, finished, request, tmp_path):
        cfg, resumed = finished
        root = ckpt.latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
        assert root is not None and root.name == f"step-{STEPS:08d}"
        assert resumed.step == STEPS and resumed.micro_step == STEPS  # it resumed at step 2 (or step 3 was redone)
        straight = run(self.config(request, tmp_path / "straight"))
        a, b = network_states(straight), network_states(resumed)
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == []

    def test_every_trainable_network_moved(self, finished):
        cfg, trainer = finished
        fresh = network_states(_FreshNetworks(build(cfg)[1]))
        trained = network_states(trainer)
        for name in trainer.networks:
            assert any(not torch.equal(fresh[k], trained[k]) for k in trained if k.startswith(name + "/")), name

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
            x = d.sample(noise, cond, steps, networks=trainer.export_networks(), generator=torch.Generator().manual_seed(0))
            assert x.shape == noise.shape and torch.isfinite(x).all()


class _FreshNetworks:
    """A freshly built distiller's trainable networks, shaped like a trainer for network_states."""

    def __init__(self, distiller):
        self.networks = distiller.trainable_networks()
