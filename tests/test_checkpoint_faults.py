"""Disk full and I/O errors while saving: the previous checkpoint stays whole and loadable, the new one leaves no
trace, and the message says what happened and where."""

import errno
import hashlib

import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.training import checkpoint as ckpt
from toy_distiller import toy_trainer


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_save_keeps_the_previous_checkpoint_whole(class_teacher, tmp_path, monkeypatch, code):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    real = ckpt.save_file
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if trainer.step == 4 and len([c for c in calls if "step-00000004" in c]) == 2:
            with open(filename, "wb") as f:  # half a file, then the disk is full
                f.write(b"\0" * 100)
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Input/output error")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing)
    root = tmp_path / "checkpoints"
    with pytest.raises(StepdistillError) as err:
        trainer.train()
    previous = root / "step-00000002"
    failed_file = [c for c in calls if "step-00000004" in c][1]
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint step-00000004 at {failed_file}: ")
    assert f"; the previous checkpoint {previous} is whole and a resume starts from it; " in message
    assert ("free disk space" if code == errno.ENOSPC else "fix the disk") in message and "\n" not in message
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # the torn folder is removed
    # the previous checkpoint is loadable and a fresh trainer resumes from it to the end
    monkeypatch.setattr(ckpt, "save_file", real)
    before = _digest(previous)
    resumed = toy_trainer(class_teacher, tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    assert resumed.resume_path() == previous
    resumed.train()
    assert resumed.step == 4 and _digest(previous) == before
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000004"]


def test_an_unfinished_folder_is_never_a_checkpoint(class_teacher, tmp_path):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    trainer.train()
    root = tmp_path / "checkpoints"
    (root / "step-00000002" / "state.json").unlink()  # as if killed mid-rename by an older writer
    (root / "step-00000003.tmp").mkdir()
    (root / "step-00000001.old").mkdir()  # a prune interrupted half-way
    assert ckpt.latest_checkpoint(root) == root / "step-00000001"
    state = ckpt.read_checkpoint(root / "step-00000001", 0)
    assert state["counters"]["step"] == 1 and all(torch.isfinite(v).all() for v in state["weights"].values())


def test_a_stale_temporary_folder_is_replaced_not_merged(class_teacher, tmp_path):
    root = tmp_path / "checkpoints"
    stale = root / "step-00000001.tmp"
    stale.mkdir(parents=True)
    (stale / "optimizer-gone.safetensors").write_bytes(b"torn")
    toy_trainer(class_teacher, tmp_path, "train.max_steps=1").train()
    names = {p.name for p in (root / "step-00000001").iterdir()}
    assert "optimizer-gone.safetensors" not in names and {"state.json", "weights.safetensors"} <= names


def test_a_failed_rename_keeps_the_previous_checkpoint(class_teacher, tmp_path, monkeypatch):
    trainer = toy_trainer(class_teacher, tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    real = ckpt.finalize

    def finalize(tmp, root, step, keep):
        if step == 2:
            raise OSError(errno.EROFS, "Read-only file system", str(root / "step-00000002"))
        return real(tmp, root, step, keep)

    monkeypatch.setattr(ckpt, "finalize", finalize)
    with pytest.raises(StepdistillError, match="could not write checkpoint step-00000002 at .*step-00000002: "
                                               "Read-only file system; the previous checkpoint .*step-00000001 is whole"):
        trainer.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
