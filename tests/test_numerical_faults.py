"""A NaN or inf loss or gradient skips that network's update (no parameter, optimizer state or EMA change), is
counted in the logs and the progress bar, and too many in a row stop the run with its last checkpoint kept."""

import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.training import checkpoint as ckpt
from toy_distiller import toy_trainer


def _inject(trainer, bad):
    """Make the toy's loss NaN for (step, network) pairs in `bad`; record each network's weights and EMA as seen
    at the start of each of its loss calls."""
    real = trainer.distiller.loss
    seen = {}

    def loss(batch, step, network):
        net = trainer.networks[network]
        ema = trainer.ema.module("generator", "ema_0.9") if network == "generator" and trainer.ema else net
        seen[(step, network)] = ([p.detach().clone() for p in net.parameters()],
                                 [p.detach().clone() for p in ema.parameters()])
        out = real(batch, step, network)
        if bad(step, network):
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.distiller.loss = loss
    return seen


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_nan_loss_skips_that_update_only(class_teacher, tmp_path, capsys):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=7", "train.checkpoint_every=0", "train.log_every=7",
                          "train.ema_decays=[0.9]", "train.lr_scheduler=constant")
    seen = _inject(trainer, lambda step, net: (step, net) in {(3, "critic"), (5, "generator")})
    trainer.train()
    # the critic's weights did not move over step 3, but did over step 2 (the check is not vacuous)
    assert _equal(seen[(3, "critic")][0], seen[(4, "critic")][0])
    assert not _equal(seen[(2, "critic")][0], seen[(3, "critic")][0])
    # the generator (updated at 0 and 5) kept its weights and its EMA over step 5; its EMA moved over step 0..5
    # (the EMA follows every step, so it moves toward the weights the step-0 update made)
    gen_after_5 = [p.detach() for p in trainer.networks["generator"].parameters()]
    assert _equal(seen[(5, "generator")][0], gen_after_5)
    ema_now = [p.detach() for p in trainer.ema.module("generator", "ema_0.9").parameters()]
    assert not _equal(seen[(0, "generator")][1], seen[(5, "generator")][1])
    # no optimizer state change: Adam counted 6 critic steps out of 7, and 1 generator step out of 2
    steps = {name: {int(s["step"]) for s in opt.optimizer.state.values()} for name, opt in trainer.optimizers.items()}
    assert steps == {"critic": {6}, "generator": {1}}
    assert trainer.nonfinite == {"critic": 1, "generator": 1}
    assert trainer.logs["nonfinite/critic"] == 1 and trainer.logs["nonfinite/generator"] == 1
    assert all(torch.isfinite(p).all() for p in ema_now)
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.logs.values())  # skipped losses are not averaged in
    out = capsys.readouterr()
    assert "step 3: critic's loss or gradient is not finite; its update was skipped (1 so far)" in out.out + out.err


def test_an_inf_gradient_with_a_finite_loss_is_skipped(class_teacher, tmp_path):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=3", "train.checkpoint_every=0",
                          "train.max_grad_norm=null")  # no clipping: the trainer measures the norm itself
    first = next(trainer.distiller.critic.parameters())
    first.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.step == 1 else g)
    trainer.train()
    assert trainer.nonfinite == {"critic": 1}
    assert {int(s["step"]) for s in trainer.optimizers["critic"].optimizer.state.values()} == {2}
    assert all(torch.isfinite(p).all() for p in trainer.distiller.critic.parameters())


def test_nonfinite_updates_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(class_teacher, tmp_path):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=20", "train.checkpoint_every=1",
                          "train.max_consecutive_nonfinite=3")
    _inject(trainer, lambda step, net: net == "critic" and step >= 2)
    with pytest.raises(StepdistillError) as err:
        trainer.train()
    last = tmp_path / "checkpoints" / "step-00000004"
    assert str(err.value).startswith(
        "training stopped at step 4: critic's loss or gradient was NaN/inf in 3 updates in a row "
        f"(train.max_consecutive_nonfinite = 3); the last good checkpoint is {last}. Lower the learning rate")
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == last
    state = ckpt.read_checkpoint(last, 0)
    assert all(torch.isfinite(v).all() for v in state["weights"].values())
    assert state["counters"]["step"] == 4


def test_max_consecutive_nonfinite_is_validated(class_teacher, tmp_path):
    from stepdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.max_consecutive_nonfinite = 0 is out of range; allowed: \[1, inf\]"):
        toy_trainer(class_teacher, tmp_path, "train.max_consecutive_nonfinite=0")
