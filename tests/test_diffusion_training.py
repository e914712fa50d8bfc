"""Plain diffusion training (the embedded teachers' method) on a flow-matching teacher: velocity target,
Euler sampling, and an exported FlowMatchEulerDiscreteScheduler pipeline that samples as the own sampler."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from helpers import assert_pipeline_matches_own_sampler, tiny_config
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runner import build, run


def test_flow_teacher_trains_on_the_velocity_target(class_flow_teacher, tmp_path):
    """The loss is the mean squared error to eps - x0 at x_t = (1 - t) x0 + t eps, with t uniform in (0, 1]."""
    teacher, d, dataset = build(tiny_config("digits/teacher_flow.yaml", class_flow_teacher, tmp_path,
                                            "distill.label_dropout=0"))
    batch = {"pixel_values": torch.rand(4, 1, 8, 8) * 2 - 1, "class_labels": torch.tensor([0, 1, 2, 3])}
    torch.manual_seed(3)
    loss = d.loss(batch, 0, "student")["loss"]
    torch.manual_seed(3)
    t = torch.rand(4).clamp(min=1e-4)
    noise = torch.randn(4, 1, 8, 8)
    x0 = batch["pixel_values"]
    tb = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        out = teacher.model((1 - tb) * x0 + tb * noise, t * 1000, encoder_hidden_states=None, class_labels=batch["class_labels"]).sample
    torch.testing.assert_close(loss.detach(), torch.mean((out - (noise - x0)) ** 2), atol=1e-5, rtol=1e-5)
    assert d.sampler_name == "euler"


def test_flow_teacher_export_samples_as_the_own_euler(class_flow_teacher, tmp_path):
    """Two training steps, then the exported pipeline (flow-matching Euler at the teacher's shift) equals the
    own sampler at 1, 2 and 4 steps."""
    trainer = run(tiny_config("digits/teacher_flow.yaml", class_flow_teacher, tmp_path, "train.max_steps=2",
                              "export.steps=[4]"))
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 2.0
    assert_pipeline_matches_own_sampler(trainer, pipe, (1, 2, 4))
