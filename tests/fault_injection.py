"""Fault injection: runs killed with SIGKILL at seeded points, resumed, and compared bit for bit.

A run is forked from the test process (torch and the teacher already loaded, so a trial costs a fraction of a
second rather than an interpreter start-up) and numbers the events it passes through: during steps each loss
call, optimizer step and EMA update; during checkpoint writes each file (killed after writing half of it), the
rename of the finished folder and the pruning of an old one. A trial kills the child at one event with SIGKILL
(no handler, no flush, no atexit), then resumes in a fresh child that runs to the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize

STEP, WRITE = "step", "write"


class Events:
    """Counts events by kind; kills this process (SIGKILL) at the `at`-th event of kind `kind`."""

    def __init__(self, kind: str | None = None, at: int = -1):
        self.kind, self.at = kind, at
        self.counts = {STEP: 0, WRITE: 0}

    def __call__(self, kind: str, before_kill=None) -> None:
        self.counts[kind] += 1
        if kind == self.kind and self.counts[kind] == self.at:
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)


def _instrument(trainer, events: Events) -> None:
    """Wrap the trainer's step pieces and the checkpoint writer so each reports its event."""
    from stepdistill.training import checkpoint as ckpt

    loss = trainer.distiller.loss

    def counted_loss(*a, **k):
        events(STEP)
        return loss(*a, **k)

    trainer.distiller.loss = counted_loss
    for opt in trainer.optimizers.values():
        inner = opt.optimizer
        step = inner.step

        def counted_step(*a, _step=step, **k):
            out = _step(*a, **k)
            events(STEP)  # after the parameters moved, before the EMA and the step counter did
            return out

        inner.step = counted_step
    if trainer.ema is not None:
        update = trainer.ema.update

        def counted_update(*a, **k):
            update(*a, **k)
            events(STEP)

        trainer.ema.update = counted_update

    real_save, real_text, real_finalize, real_discard = ckpt.save_file, ckpt.write_text, ckpt.finalize, ckpt._discard

    def save_file(tensors, filename, metadata=None):
        data = serialize(tensors, metadata)
        events(WRITE, lambda: Path(filename).write_bytes(data[: len(data) // 2]))  # killed half-way through
        real_save(tensors, filename, metadata=metadata)

    def write_text(text, path):
        events(WRITE, lambda: Path(path).write_text(text[: len(text) // 2]))
        real_text(text, path)

    def finalize(*a, **k):
        events(WRITE)  # the folder is whole, not yet renamed
        return real_finalize(*a, **k)

    def discard(path):
        events(WRITE, lambda: os.replace(path, path.with_name(path.name + ".old")))  # renamed aside, not deleted
        real_discard(path)

    ckpt.save_file, ckpt.write_text, ckpt.finalize, ckpt._discard = save_file, write_text, finalize, discard


def forked(fn, *args) -> int:
    """Run fn(*args) in a forked child; its exit status, or minus the signal that killed it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def train_child(teacher, output_dir: Path, options: list[str], kind: str | None, at: int) -> None:
    import warnings

    from stepdistill.training import checkpoint as ckpt
    from toy_distiller import toy_trainer

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden")  # our wrapper
    ckpt.sync = lambda path: None  # fsync guards against power loss; a killed process loses nothing it wrote
    trainer = toy_trainer(teacher, output_dir, *options)
    events = Events(kind, at)
    _instrument(trainer, events)
    trainer.train()
    (output_dir / "events.json").write_text(json.dumps(events.counts))


def final_state(output_dir: Path, max_steps: int) -> dict:
    """Every tensor and plain value of the final checkpoint: weights, EMA, optimizer and scheduler state, RNG."""
    folder = output_dir / "checkpoints" / f"step-{max_steps:08d}"
    out = {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    out["state.json"] = (folder / "state.json").read_text()
    return out


def identical(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def kill_points(counts: dict, trials: int, seed: int) -> list[tuple[str, int]]:
    """`trials` seeded (kind, event number) pairs, alternating kills during steps and during writes."""
    rng = random.Random(seed)
    kinds = [STEP if i % 2 == 0 else WRITE for i in range(trials)]
    return [(kind, rng.randint(1, counts[kind])) for kind in kinds]


def run_trials(teacher, root: Path, options: list[str], max_steps: int, trials: int, seed: int = 0) -> dict:
    """The reference run, then `trials` kill-and-resume trials; returns the counts the issue asks for."""
    ref = root / "reference"
    assert forked(train_child, teacher, ref, options, None, -1) == 0, "the uninterrupted run failed"
    counts = json.loads((ref / "events.json").read_text())
    expected = final_state(ref, max_steps)
    report = {"trials": 0, STEP: 0, WRITE: 0, "killed": 0, "identical": 0, "events": counts, "failures": []}
    for i, (kind, at) in enumerate(kill_points(counts, trials, seed)):
        out = root / f"trial-{i:02d}"
        killed = forked(train_child, teacher, out, options, kind, at) == -signal.SIGKILL
        resumed = forked(train_child, teacher, out, options, None, -1) == 0
        same = resumed and identical(final_state(out, max_steps), expected)
        report["trials"] += 1
        report[kind] += 1
        report["killed"] += killed
        report["identical"] += same
        if not (killed and same):
            report["failures"].append((i, kind, at, killed, resumed))
    return report
