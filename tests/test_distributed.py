import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_process_ddp_run_keeps_ranks_in_sync(class_teacher, tmp_path):
    """torchrun starts two CPU processes (gloo); accelerate picks up the process group unchanged."""
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(class_teacher), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fingerprints = [(tmp_path / f"rank-{r}-of-2.txt").read_text() for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]  # DDP averaged the gradients: both ranks hold the same student
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert (ckpt / "rng-0.safetensors").is_file() and (ckpt / "rng-1.safetensors").is_file()
    assert (tmp_path / "student" / "model_index.json").is_file()
