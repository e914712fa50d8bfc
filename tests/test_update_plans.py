"""The trainer's update plans, on a toy two-network distiller written in the tests (tests/toy_distiller.py):
no gradient crosses between networks, a 1:5 plan updates each the right number of times, per-network
settings apply, and a crash and resume reaches the uninterrupted run's state bit for bit."""

import pytest
import torch

from stepdistill.errors import ConfigError, StepdistillError
from stepdistill.training.trainer import Trainer
from toy_distiller import toy_trainer


def _state(trainer):
    return {f"{g}/{n}": p.detach().clone() for g, net in trainer.networks.items() for n, p in net.named_parameters()}


def _adam_steps(trainer, name):
    states = trainer.optimizers[name].optimizer.state.values()
    return {int(s["step"]) for s in states}


def test_no_gradient_reaches_a_network_outside_its_update(class_teacher, tmp_path):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=6", "train.checkpoint_every=0")
    critic_before = {n: p.detach().clone() for n, p in trainer.distiller.critic.named_parameters()}
    trainer.train()
    seen = trainer.distiller.seen
    assert {net for _, net, *_ in seen} == {"generator", "critic"}
    # every loss call started with no gradient left anywhere, and with the other network frozen
    assert not any(stale for _, _, stale, _, _ in seen)
    assert not any(other_trainable for _, _, _, other_trainable, _ in seen)
    assert all(p.grad is None for net in trainer.networks.values() for p in net.parameters())
    assert all(p.requires_grad for net in trainer.networks.values() for p in net.parameters())  # restored after
    # the critic did train (the comparison above is not vacuous)
    assert any(not torch.equal(critic_before[n], p) for n, p in trainer.distiller.critic.named_parameters())


def test_generator_loss_leaves_the_critic_unchanged(class_teacher, tmp_path):
    """With the critic out of the plan, the generator's loss (which runs through the critic) moves only the
    generator."""
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=2", "train.checkpoint_every=0")
    trainer.distiller.update_plan = lambda step: ["generator"]
    critic_before = {n: p.detach().clone() for n, p in trainer.distiller.critic.named_parameters()}
    gen_before = {n: p.detach().clone() for n, p in trainer.distiller.generator.named_parameters()}
    trainer.train()
    assert all(torch.equal(critic_before[n], p) for n, p in trainer.distiller.critic.named_parameters())
    assert any(not torch.equal(gen_before[n], p) for n, p in trainer.distiller.generator.named_parameters())


def test_one_to_five_plan_updates_each_network_the_planned_number_of_times(class_teacher, tmp_path):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=11", "train.checkpoint_every=0").train()
    assert _adam_steps(trainer, "critic") == {11}
    assert _adam_steps(trainer, "generator") == {3}  # steps 0, 5 and 10
    calls = [(step, net) for step, net, *_ in trainer.distiller.seen]
    assert [s for s, n in calls if n == "generator"] == [0, 5, 10]
    assert trainer.logs["loss/critic"] > 0 and "loss/generator" in trainer.logs and "generator/fake_mean" in trainer.logs


def test_per_network_learning_rate_clipping_and_loss_scale_apply(class_teacher, tmp_path):
    norms = {}

    def record(trainer):
        for name, opt in trainer.optimizers.items():
            inner = opt.optimizer
            original = inner.step

            def step(*a, name=name, inner=inner, original=original, **k):
                grads = [p.grad.flatten() for group in inner.param_groups for p in group["params"] if p.grad is not None]
                norms.setdefault(name, []).append(float(torch.cat(grads).norm()))
                return original(*a, **k)

            inner.step = step

    opts = ["train.max_steps=1", "train.checkpoint_every=0", "train.learning_rate=1e-3", "train.weight_decay=0",
            "train.lr_scheduler=constant", "train.max_grad_norm=1000", "train.groups.critic.max_grad_norm=1e-6"]
    plain = toy_trainer(class_teacher, tmp_path / "plain", *opts)
    record(plain)
    plain.train()
    plain_norms = dict(norms)
    norms.clear()
    tuned = toy_trainer(class_teacher, tmp_path / "tuned", *opts, "train.groups.generator.learning_rate=0.1",
                        "train.groups.generator.loss_scale=100")
    before = _state(tuned)
    record(tuned)
    tuned.train()
    after = _state(tuned)
    assert [g["lr"] for g in tuned.optimizers["generator"].optimizer.param_groups] == [0.1]
    assert [g["lr"] for g in tuned.optimizers["critic"].optimizer.param_groups] == [1e-3]
    # Adam's first step moves each weight by about its learning rate
    moved = {g: max((after[k] - before[k]).abs().max().item() for k in before if k.startswith(g + "/"))
             for g in ("generator", "critic")}
    assert 0.05 < moved["generator"] < 0.11 and 5e-4 < moved["critic"] < 1.1e-3  # clipping: Adam still moves ~lr
    # the critic's gradient was clipped to 1e-6; the generator's (below 1000) was not, and is 100x by its loss scale
    # (the critic, updated first, moved the same in both runs: the generator's losses differ by the scale alone)
    assert norms["critic"][0] <= 1e-6 * 1.001 < tuned.logs["grad_norm/critic"]
    assert norms["generator"][0] == pytest.approx(tuned.logs["grad_norm/generator"], rel=1e-5)
    assert norms["generator"][0] == pytest.approx(100 * plain_norms["generator"][0], rel=1e-4)


def test_unknown_group_and_plan_names_are_refused(class_teacher, tmp_path):
    with pytest.raises(ConfigError, match="train.groups.fake_score: toy has no trainable network of that name; its "
                                          "networks are generator, critic"):
        toy_trainer(class_teacher, tmp_path, "train.groups.fake_score.learning_rate=1e-5")
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=1")
    trainer.distiller.update_plan = lambda step: ["student"]
    with pytest.raises(StepdistillError, match="update_plan names 'student'"):
        trainer.train()


class Crash(Exception):
    pass


def test_crash_and_resume_reach_the_uninterrupted_state_bit_for_bit(class_teacher, tmp_path, monkeypatch):
    opts = ["train.max_steps=8", "train.checkpoint_every=3", "train.ema_decays=[0.9]", "train.lr_scheduler=cosine",
            "train.lr_warmup_steps=2", "train.keep_checkpoints=5", "distill.generator_every=2"]
    straight = toy_trainer(class_teacher, tmp_path / "a", *opts).train()

    original = Trainer.save_checkpoint

    def save_then_crash(self):
        path = original(self)
        if self.step == 6:
            raise Crash("killed after the step-6 checkpoint")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        toy_trainer(class_teacher, tmp_path / "b", *opts).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = toy_trainer(class_teacher, tmp_path / "b", *opts).train()
    assert resumed.step == straight.step == 8
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("generator", "critic"):
        sa, sb = straight.optimizers[name].optimizer.state_dict(), resumed.optimizers[name].optimizer.state_dict()
        for idx in sa["state"]:
            for key, v in sa["state"][idx].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][idx][key]))
    ea, eb = straight.ema.state_dict(), resumed.ema.state_dict()
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    # the shared draws agree at every step, before and after the resume
    draws_a = {(s, n): d for s, n, *_, d in straight.distiller.seen}
    draws_b = {(s, n): d for s, n, *_, d in resumed.distiller.seen}
    assert all(draws_a[k] == v for k, v in draws_b.items())
    # both networks really moved from their initial weights
    fresh = _state(toy_trainer(class_teacher, tmp_path / "c", *opts))
    for g in ("generator", "critic"):
        assert any(not torch.equal(fresh[k], a[k]) for k in a if k.startswith(g + "/"))


def test_shared_generator_depends_on_seed_and_step_only(class_teacher, tmp_path):
    d = toy_trainer(class_teacher, tmp_path).distiller
    draw = lambda step: torch.rand(3, generator=d.shared_generator(step))  # noqa: E731
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    torch.manual_seed(123)  # the global RNG does not enter
    assert torch.equal(draw(5), draw(5))


def test_a_group_of_two_networks_updates_together_under_one_optimizer(class_teacher, tmp_path):
    """The critic split into a body and a head, both in group 'critic' (as DMD2's fake score and GAN head)."""
    from torch import nn

    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=1")
    d = trainer.distiller

    class Split(type(d)):
        def __init__(self, teacher, config):
            super().__init__(teacher, config)
            self.body, self.head = self.critic[:2], nn.Sequential(*self.critic[2:])

        def trainable_networks(self):
            return {"generator": self.generator, "body": self.body, "head": self.head}

        def optimizer_groups(self):
            return {"generator": ["generator"], "critic": ["body", "head"]}

    from toy_distiller import NoiseImages
    from stepdistill.training.trainer import Trainer as T

    split = Split(d.teacher_info, d.config)
    trainer = T(split, NoiseImages(d.teacher_info.sample_shape), trainer.cfg)
    before = _state(trainer)
    trainer.train()
    assert set(trainer.optimizers) == {"generator", "critic"}
    assert {k.split("/")[0] for k in trainer.trainable_state()} == {"generator", "body", "head"}
    after = _state(trainer)
    for net in ("body", "head"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(net + "/"))

    class Broken(Split):
        def optimizer_groups(self):
            return {"generator": ["generator"], "critic": ["body"]}  # head in no group

    with pytest.raises(StepdistillError, match="optimizer_groups must hold each trainable network once; 'head'"):
        T(Broken(d.teacher_info, d.config), NoiseImages(d.teacher_info.sample_shape), trainer.cfg)
