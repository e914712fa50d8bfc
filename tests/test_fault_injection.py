"""Kill (SIGKILL) a toy training run at seeded points during steps and during checkpoint writes, resume it, and
get the uninterrupted run's final weights, EMA, optimizer, scheduler and RNG state bit for bit (tests/fault_injection.py)."""

import json
import os

import pytest

from fault_injection import run_trials
from stepdistill.teacher import load_teacher

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks its runs")

OPTIONS = ["train.max_steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.ema_decays=[0.9]",
           "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "distill.generator_every=2"]


def test_killed_runs_resume_to_the_uninterrupted_state_bit_for_bit(class_teacher, tmp_path):
    report = run_trials(load_teacher(str(class_teacher)), tmp_path, OPTIONS, max_steps=6, trials=22, seed=16)
    print("fault injection:", json.dumps(report))
    assert report["events"]["step"] > 20 and report["events"]["write"] > 40  # both kinds have many kill points
    assert report["trials"] == 22 and report["step"] == 11 and report["write"] == 11
    assert report["failures"] == [] and report["killed"] == report["identical"] == 22


def test_the_harness_catches_a_resume_that_loses_state(class_teacher, tmp_path, monkeypatch):
    """A resume that forgets the RNG state (children inherit the patch) does not pass as bit-identical."""
    from stepdistill.training import checkpoint as ckpt

    monkeypatch.setattr(ckpt, "restore_rng", lambda rng: None)
    report = run_trials(load_teacher(str(class_teacher)), tmp_path, OPTIONS, max_steps=6, trials=2, seed=3)
    assert report["killed"] == 2 and report["identical"] < 2
