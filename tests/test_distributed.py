import os
import subprocess
import sys
from pathlib import Path

import pytest


def torchrun(worker: str, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).parent / worker), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_run_keeps_ranks_in_sync(class_teacher, tmp_path):
    """torchrun starts two CPU processes (gloo); accelerate picks up the process group unchanged."""
    torchrun("ddp_worker.py", class_teacher, tmp_path)
    fingerprints = [(tmp_path / f"rank-{r}-of-2.txt").read_text() for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]  # DDP averaged the gradients: both ranks hold the same student
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert (ckpt / "rng-0.safetensors").is_file() and (ckpt / "rng-1.safetensors").is_file()
    assert (tmp_path / "student" / "model_index.json").is_file()


def test_two_networks_each_wrapped_for_ddp_stay_in_sync_across_ranks(class_teacher, tmp_path):
    """The toy generator and critic are DDP-wrapped on their own; after a 1:5 plan both ranks hold the same
    weights of both, and the shared generator gave both ranks the same draws."""
    import json

    torchrun("ddp_toy_worker.py", class_teacher, tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["wrapped"] == {"generator": "DistributedDataParallel", "critic": "DistributedDataParallel"}
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["draws"] == ranks[1]["draws"] and len(set(ranks[0]["draws"])) > 1


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(class_teacher, tmp_path):
    """Rank 1 alone sees a NaN loss (its gradients finite): both ranks skip that critic update and stay in sync."""
    import json

    torchrun("ddp_toy_worker.py", class_teacher, tmp_path, "nan-on-rank-1")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"] == {"critic": 1}
    assert ranks[0]["weights"] == ranks[1]["weights"]
