"""Speed options that cannot change results beyond rounding: fused AdamW where torch has it, TF32 on CUDA."""

import torch

from helpers import tiny_config
from stepdistill.runner import build
from stepdistill.training.trainer import Trainer, fused_adamw


def test_fused_adamw_where_torch_has_it():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert fused_adamw(cpu) is (True if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 4) else None)
    assert fused_adamw([torch.nn.Parameter(torch.zeros(3, device="meta"))]) is None
    assert fused_adamw([]) is None


def test_trainer_uses_fused_adamw_and_the_step_matches_foreach(class_teacher, tmp_path):
    """The trainer's optimizer is the fused one; one AdamW step gives foreach's weights to rounding."""
    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=1")
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg)
    opt = trainer.optimizers["student"].optimizer
    params = [p for _, p in trainer.params["student"]]
    assert opt.param_groups[0]["fused"] is fused_adamw(params)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    g = torch.Generator().manual_seed(0)
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    group = opt.param_groups[0]
    plain = torch.optim.AdamW(twins, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"], foreach=True)
    opt.step()
    plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


class _Stop(Exception):
    pass


def _stop(source, **kwargs):
    raise _Stop


def test_allow_tf32_follows_the_config_on_cuda(class_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("stepdistill.runner.load_teacher", _stop)  # only the flags matter: stop before loading
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for flag in (False, True):
            cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, f"train.allow_tf32={str(flag).lower()}")
            try:
                build(cfg)
            except _Stop:
                pass
            assert torch.backends.cuda.matmul.allow_tf32 is flag and torch.backends.cudnn.allow_tf32 is flag
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
