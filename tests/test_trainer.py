import json

import pytest
import torch

from helpers import student_state, tiny_config
from stepdistill.runner import build, run
from stepdistill.training import checkpoint as ckpt
from stepdistill.training.trainer import Trainer

RESUME_OPTS = ["train.max_steps=4", "train.checkpoint_every=2", "train.ema_decays=[0.9]", "train.lr_scheduler=cosine",
               "train.lr_warmup_steps=1", "train.keep_checkpoints=5"]


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_the_uninterrupted_run(class_teacher, tmp_path, monkeypatch):
    straight = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path / "a", *RESUME_OPTS))

    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path / "b", *RESUME_OPTS)
    original = Trainer.save_checkpoint

    def save_then_crash(self):
        path = original(self)
        if self.step == 2:
            raise Crash("killed after the step-2 checkpoint")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run(cfg)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = run(cfg)  # train.resume=auto picks up step 2

    assert resumed.step == straight.step == 4
    a, b = student_state(straight), student_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("target", "ema_0.9"):
        for p, q in zip(straight.ema.module("student", name).parameters(), resumed.ema.module("student", name).parameters()):
            assert torch.equal(p, q)
    # the run really did change the weights (the comparison is not trivially true)
    teacher_sd = straight.distiller.teacher.model.state_dict()
    assert any(not torch.equal(a[k], teacher_sd[k]) for k in a)


def test_checkpoints_are_atomic_and_pruned(class_teacher, tmp_path):
    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=3", "train.checkpoint_every=1",
                      "train.keep_checkpoints=2")
    root = tmp_path / "checkpoints"
    root.mkdir(parents=True)
    (root / "step-00000099.tmp").mkdir()  # a half-written checkpoint from a crash is never resumed
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg)
    assert trainer.resume_path() is None
    trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    state = json.loads((root / "step-00000003" / "state.json").read_text())
    assert state["counters"] == {"step": 3, "micro_step": 3}
    assert (root / "step-00000003" / "rng-0.safetensors").is_file()


def test_gradient_accumulation_and_bf16_autocast_run(class_teacher, tmp_path):
    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2",
                      "train.gradient_accumulation_steps=2", "train.mixed_precision=bf16", "train.checkpoint_every=0")
    trainer = run(cfg)
    assert trainer.step == 2 and trainer.micro_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.distiller.student.parameters())


def test_run_writes_sample_grids_and_export(class_teacher, tmp_path):
    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2", "train.sample_every=1",
                      "train.report_to=tensorboard", "train.log_every=1")
    run(cfg)
    from PIL import Image

    grid = Image.open(tmp_path / "samples" / "step-00000002.png")
    assert grid.size[0] > 8
    for steps in (1, 2, 4):
        assert (tmp_path / "samples" / f"student-{steps}step.png").is_file()
    assert (tmp_path / "student" / "model_index.json").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))  # the tracker wrote its log


def test_kernel_choices_reach_the_models(class_teacher, tmp_path):
    """kernels.attention sets the processors of teacher and student; kernels.ema picks the EMA updater."""
    from diffusers.models.attention_processor import Attention

    from stepdistill.kernels.attention import FlashAttnProcessor

    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=1", "kernels.attention=triton",
                      "kernels.ema=foreach")
    trainer = run(cfg)  # under TRITON_INTERPRET=1 the Triton path runs on the CPU
    d = trainer.distiller
    for net in (d.teacher.model, d.student, trainer.ema.module("student", "target")):
        procs = [m.processor for m in net.modules() if isinstance(m, Attention)]
        assert procs and all(isinstance(p, FlashAttnProcessor) for p in procs)
    assert trainer.ema.emas["student"]._fused is None  # foreach


def test_frozen_networks_stay_in_eval_mode_while_the_student_trains(class_teacher, tmp_path, monkeypatch):
    from stepdistill.distillers.consistency import ConsistencyDistiller

    modes = []
    real = ConsistencyDistiller.loss

    def recording(self, batch, step, network):
        modes.append((self.teacher.model.training, self.distance.lpips.training, self.student.training))
        return real(self, batch, step, network)

    monkeypatch.setattr(ConsistencyDistiller, "loss", recording)
    run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2", "distill.loss=lpips"))
    assert modes == [(False, False, True)] * 2  # LPIPS's dropout and the teacher stay in eval mode


def test_data_free_run_on_conditions_alone(class_teacher, tmp_path):
    """data.dataset = none: class labels only; consistency distillation starts from the teacher's own DDIM."""
    trainer = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2",
                              "data.dataset=none", "distill.data_free_steps=1"))
    assert trainer.step == 2 and trainer.logs["loss/student"] > 0
    from stepdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="method 'progressive' trains on images, and data.dataset = 'none' has none"):
        build(tiny_config("digits/progressive.yaml", class_teacher, tmp_path / "p", "data.dataset=none",
                          "distill.round=1", "distill.start_steps=8"))
