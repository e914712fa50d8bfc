"""Run by torchrun in test_distributed.py: the toy two-network distiller on two gloo processes, each network
wrapped for DDP on its own; each rank records a fingerprint of both networks and its shared draws. With
`nan-on-rank-1`, rank 1's critic loss reads NaN at step 2 while its gradients stay finite (a detached NaN added):
only the cross-process check makes rank 0 skip that update too."""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_distiller import toy_trainer  # noqa: E402

torch.set_num_threads(1)
teacher, out = sys.argv[1], Path(sys.argv[2])
trainer = toy_trainer(teacher, out, "train.max_steps=6", "train.checkpoint_every=3")
if sys.argv[3:] == ["nan-on-rank-1"]:
    real = trainer.distiller.loss

    def loss(batch, step, network):
        out = real(batch, step, network)
        if network == "critic" and step == 2 and trainer.accelerator.process_index == 1:
            out["loss"] = out["loss"] + torch.tensor(float("nan")).detach()
        return out

    trainer.distiller.loss = loss
trainer.train()
h = hashlib.sha256()
for name in ("generator", "critic"):
    for p in trainer.networks[name].parameters():
        h.update(p.detach().cpu().numpy().tobytes())
rank = trainer.accelerator.process_index
wrapped = {name: type(m).__name__ for name, m in trainer.prepared.items()}
draws = [d for *_, d in trainer.distiller.seen]
(out / f"rank-{rank}.json").write_text(json.dumps({"weights": h.hexdigest(), "wrapped": wrapped, "draws": draws,
                                                      "nonfinite": trainer.nonfinite}))
