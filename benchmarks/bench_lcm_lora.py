"""Step time and peak memory of LCM-LoRA (training_configs/sd15/lcm_lora.yaml) against full fine-tuning of the
same config, on a tiny SD1.5-shaped pipeline built offline (tests/tiny_models.py).

    python benchmarks/bench_lcm_lora.py                     # tiny and small UNets, 20 timed steps each
    python benchmarks/bench_lcm_lora.py --sizes small --steps 30 --batch 4

Each (size, mode) runs in its own process, so peak memory is that run's alone: on CUDA the peak of
torch.cuda.max_memory_allocated over the training steps, on CPU the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs just before training) above its resident set at that moment; the
absolute peak is reported too. CPU children run with MALLOC_MMAP_THRESHOLD_=131072, which stops glibc from
raising its mmap threshold and keeping freed tensor memory, so the resident set follows live tensors. The step is the trainer's: teacher CFG step, student and target forward,
backward, clipping, AdamW and the EMA update. Prints a markdown table with LoRA / full ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def measure(size: str, mode: str, steps: int, warmup: int, batch: int) -> dict:
    """One run: mode 'full' (lora_rank 0) or 'lora<rank>' (the config with that rank and alpha)."""
    import torch

    import tiny_models as tm
    from stepdistill.config import load_config
    from stepdistill.paths import CONFIGS
    from stepdistill.runner import build
    from stepdistill.training.trainer import Trainer

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    unet = tm.small_sd15_unet() if size == "small" else None
    teacher = tm.save_sd15_teacher(tmp / "sd15", unet=unet)
    res = (unet.config.sample_size if unet is not None else 8) * 2
    folder = tm.write_caption_folder(tmp / "data", n=16, size=res)
    overrides = [f"teacher={teacher}", f"output_dir={tmp / 'run'}", "data.dataset=folder", f"data.path={folder}",
                 f"data.resolution={res}", f"train.batch_size={batch}", "train.report_to=none",
                 "train.progress_bar=false", f"train.max_steps={steps + warmup}",
                 "train.mixed_precision=" + ("fp16" if torch.cuda.is_available() else "'no'")]
    if mode == "full":
        overrides.append("distill.lora_rank=0")  # the same config, fine-tuning every weight
    else:
        rank = int(mode.removeprefix("lora"))
        overrides += [f"distill.lora_rank={rank}", f"distill.lora_alpha={rank}"]
    cfg = load_config(CONFIGS / "sd15/lcm_lora.yaml", overrides)
    _, distiller, dataset = build(cfg)
    trainer = Trainer(distiller, dataset, cfg)
    acc, model = trainer.accelerator, trainer.model
    from stepdistill.training.data import batch_iterator

    data = batch_iterator(dataset, batch, cfg.seed, 0, 0, 1)
    cuda = torch.cuda.is_available()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        loss = model(next(data), step)["student"]
        acc.backward(loss)
        acc.clip_grad_norm_(trainer.groups["student"], cfg.train.max_grad_norm)
        trainer.optimizers["student"].step()
        trainer.optimizers["student"].zero_grad(set_to_none=True)
        if trainer.ema is not None:
            trainer.ema.update()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    params = list(distiller.student.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"size": size, "mode": mode, "device": "cuda" if cuda else "cpu", "step_s": statistics.median(times),
            "peak_bytes": peak - base, "peak_abs_bytes": peak, "trainable_params": trainable, "total_params": sum(p.numel() for p in params),
            "optimizer_state_bytes": 2 * 4 * trainable}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 8],
                   help="LoRA ranks (64: the config's; 8: about SD1.5's rank-to-width ratio on the small UNet)")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.warmup, args.batch)))
        return
    rows = []
    for size in args.sizes:
        for mode in [f"lora{r}" for r in args.ranks] + ["full"]:
            out = subprocess.run([sys.executable, __file__, "--child", size, mode, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"measured {size} {mode}: {rows[-1]['step_s'] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    print(f"| UNet | mode | device | trainable / total params | step (median of {args.steps}) | "
          "peak memory of training (above start) | peak (absolute) | LoRA / full: step, memory above start |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        full = next(r for r in rows if r["size"] == size and r["mode"] == "full")
        for r in (r for r in rows if r["size"] == size):
            ratio = (f"{r['step_s'] / full['step_s']:.2f}, {r['peak_bytes'] / max(full['peak_bytes'], 1):.2f}"
                     if r is not full else "1, 1")
            print(f"| {size} | {r['mode']} | {r['device']} | {r['trainable_params']:,} / {r['total_params']:,} | "
                  f"{r['step_s'] * 1e3:.1f} ms | {r['peak_bytes'] / 2**20:.1f} MiB | {r['peak_abs_bytes'] / 2**20:.0f} MiB "
                  f"| {ratio} |")


if __name__ == "__main__":
    main()
