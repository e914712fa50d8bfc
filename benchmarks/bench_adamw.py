"""One AdamW step on the small SD1.5-shaped UNet (8.5M parameters, tests/tiny_models.py): torch's default
(foreach) against fused=True, which the trainer now uses where torch has it (training/trainer.py fused_adamw).

  python benchmarks/bench_adamw.py [--threads 1] [--steps 10]

Median seconds of `opt.step()` after one warm-up step, random gradients, two interleaved rounds.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models as tm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for _ in range(2):
        for name, fused in (("foreach (default)", None), ("fused", True)):
            torch.manual_seed(0)
            m = tm.small_sd15_unet().to(args.device)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
            opt.step()
            times = []
            for _ in range(args.steps):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                opt.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            n = sum(p.numel() for p in m.parameters()) / 1e6
            print(f"{name}: {sorted(times)[len(times) // 2] * 1e3:.1f} ms median, {n:.1f}M params")


if __name__ == "__main__":
    main()
