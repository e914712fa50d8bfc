"""Run by torchrun in test_distributed.py: a short CD run on two gloo processes; each rank
records a fingerprint of its final student weights."""

import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config  # noqa: E402
from stepdistill.runner import run  # noqa: E402

torch.set_num_threads(1)
teacher, out = sys.argv[1], Path(sys.argv[2])
trainer = run(tiny_config("digits/consistency.yaml", teacher, out, "train.max_steps=3", "train.checkpoint_every=3"))
h = hashlib.sha256()
for p in trainer.distiller.student.parameters():
    h.update(p.detach().cpu().numpy().tobytes())
rank = trainer.accelerator.process_index
(out / f"rank-{rank}-of-{trainer.accelerator.num_processes}.txt").write_text(h.hexdigest())
