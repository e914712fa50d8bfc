"""EMA update speed: our multi-rate updaters vs diffusers' EMAModel.step and a per-tensor loop.

Parameters are laid out like a UNet2DConditionModel (SD1.5 config, 686 tensors of very different
sizes) scaled to the requested total, so per-tensor overheads are realistic. EMAModel keeps one
model copy per rate, so R rates cost R EMAModel.step calls; every shadow is fp32.

  python benchmarks/bench_ema.py                       # CPU: 100M params, 1 and 3 rates
  python benchmarks/bench_ema.py --device cuda         # GPU: 100M, 1B, 2.6B params

GB/s counts the bytes an ideal update must move: live read once, each shadow read and written.
On CPU the methods run interleaved, round after round, and the best round counts (the machine
may be shared); on CUDA each is timed with CUDA events after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from timing import cuda_seconds


def sd_like_sizes(total: int) -> list[int]:
    """Parameter sizes of SD1.5's UNet (built on the meta device, nothing allocated), scaled to `total`."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    sizes = [p.numel() for p in unet.parameters()]
    scale = total / sum(sizes)
    return [max(1, round(s * scale)) for s in sizes]


def methods(live, rates: int, device: str):
    """name -> (setup() -> step() callable). Each setup allocates its own fp32 shadows."""
    from diffusers.training_utils import EMAModel

    from stepdistill.kernels.ema import BlockedMultiRateEMA, FusedMultiRateEMA

    decays = [0.999, 0.99, 0.95][:rates] + [0.9] * max(0, rates - 3)
    weights = [1 - d for d in decays]

    def shadows():
        return [[p.detach().float().clone() for p in live] for _ in range(rates)]

    def ema_model(foreach):
        def setup():
            emas = [EMAModel([p.detach().float().clone() for p in live], decay=d, foreach=foreach) for d in decays]
            for e in emas:
                e.optimization_step = 10 ** 6  # past warm-up: decay is the constant given

            def step():
                for e in emas:
                    e.step(live)
            return step
        return setup

    def loop():
        sh = shadows()

        def step():
            for i, p in enumerate(live):
                x = p.detach().float()
                for r, w in enumerate(weights):
                    sh[r][i].lerp_(x, w)
        return step

    def foreach():
        sh = shadows()

        def step():  # what MultiRateEMA does with kernels.ema=foreach
            x = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in live]
            for s, w in zip(sh, weights):
                torch._foreach_lerp_(s, x, w)
        return step

    def ours(cls):
        def setup():
            updater = cls(live, shadows())
            return lambda: updater.step(decays)
        return setup

    out = {"EMAModel.step": ema_model(False), "EMAModel.step(foreach=True)": ema_model(True),
           "per-tensor lerp_ loop": loop, "foreach_lerp_ (our fallback)": foreach}
    if device == "cuda":
        out["FusedMultiRateEMA (Triton)"] = ours(FusedMultiRateEMA)
    out["BlockedMultiRateEMA (CPU path)" if device == "cpu" else "BlockedMultiRateEMA"] = ours(BlockedMultiRateEMA)
    return out


def time_cpu(steps: dict, rounds: int) -> dict:
    for fn in steps.values():
        fn()
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--params", type=float, nargs="+", default=None, help="total parameter counts")
    ap.add_argument("--rates", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="live parameter dtypes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = args.params or ([1e8] if args.device == "cpu" else [1e8, 1e9, 2.6e9])
    if args.device == "cpu" and max(params) > 1e8:
        print("note: above 100M parameters on CPU each method holds several GB and a round takes seconds; "
              "the 2.6B case is meant for the GPU (--device cuda)")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# EMA update, {where}, torch {torch.__version__}")
    for total in params:
        sizes = sd_like_sizes(int(total))
        for dtype in args.dtype:
            g = torch.Generator().manual_seed(0)
            live = [torch.nn.Parameter(torch.randn(n, generator=g).to(getattr(torch, dtype)).to(args.device))
                    for n in sizes]
            for rates in args.rates:
                elem = live[0].element_size()
                nbytes = sum(sizes) * (elem + 8 * rates)
                print(f"\n## {sum(sizes) / 1e6:.0f}M params in {len(sizes)} tensors, live {dtype}, {rates} rate(s)")
                print(f"{'method':34s} {'ms':>9s} {'GB/s':>7s} {'vs EMAModel.step':>17s}")
                setups = methods(live, rates, args.device)
                if args.device == "cpu":
                    results = time_cpu({k: s() for k, s in setups.items()}, args.rounds)
                else:
                    results = {}
                    for k, s in setups.items():  # one at a time: 2.6B x rates x 4 bytes per method
                        results[k] = cuda_seconds(s(), args.rounds)
                        gc.collect()
                        torch.cuda.empty_cache()
                base = results["EMAModel.step"]
                for k, t in results.items():
                    print(f"{k:34s} {t * 1e3:9.1f} {nbytes / t / 1e9:7.1f} {base / t:16.2f}x")
                gc.collect()
            del live
            gc.collect()


if __name__ == "__main__":
    main()
