"""Attention speed at the shapes of SD1.5, SDXL, SD3 and DiT: our Triton kernel vs PyTorch SDPA's
backends (flash, memory-efficient, math via torch.nn.attention.sdpa_kernel) and xformers when
installed, forward and forward+backward, in TFLOP/s, with ratios to SDPA's flash backend.

  python benchmarks/bench_attention.py                 # CUDA: the full table (bf16; --dtype float16)
  python benchmarks/bench_attention.py --device cpu    # what a CPU can say (see cpu_report)

FLOPs: forward 4*B*H*Lq*Lk*D (two matmuls); forward+backward 3.5x that (five more half-size
matmul pairs in backward), the usual FlashAttention accounting; no recomputation credited.
The Triton kernel is autotuned on first use per shape; the warm-up call absorbs that.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from timing import cuda_seconds

SHAPES = {  # name: (B, H, Lq, Lk, D)
    "SD1.5 64x64 self (512px)": (2, 8, 4096, 4096, 40),
    "SD1.5 64x64 cross (77 tok)": (2, 8, 4096, 77, 40),
    "SD1.5 32x32 self": (2, 8, 1024, 1024, 80),
    "SD1.5 16x16 self": (2, 8, 256, 256, 160),
    "SDXL 64x64 self (1024px)": (2, 10, 4096, 4096, 64),
    "SDXL 32x32 self": (2, 20, 1024, 1024, 64),
    "SDXL 64x64 cross (77 tok)": (2, 10, 4096, 77, 64),
    "SD3-medium joint (4096+333)": (2, 24, 4429, 4429, 64),
    "DiT-XL/2 256px": (8, 16, 256, 256, 72),
    "DiT-XL/2 512px": (4, 16, 1024, 1024, 72),
}


def flops(b, h, lq, lk, d, backward: bool) -> float:
    f = 4.0 * b * h * lq * lk * d
    return f * 3.5 if backward else f


def timer(device: str):
    """Seconds per call of fn(): CUDA events on GPU, best of several on CPU."""
    def cpu(fn, reps):
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best
    return cuda_seconds if device == "cuda" else cpu


def backends(device: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(kind):
        def run(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    out = {}
    if device == "cuda":
        from stepdistill.kernels.attention import flash_attention

        out["triton (ours)"] = flash_attention
    out["sdpa flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    if device == "cuda":
        out["sdpa efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
    out["sdpa math"] = sdpa(SDPBackend.MATH)
    try:
        import xformers.ops as xops

        if device == "cuda":
            out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    except ImportError:
        pass
    return out


def measure(fn, shape, dtype, device, reps, backward: bool):
    b, h, lq, lk, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g, requires_grad=backward)
               for n in (lq, lk, lk))
    go = torch.randn(b, h, lq, d, device=device, dtype=dtype, generator=g)
    if backward:
        def call():
            torch.autograd.grad(fn(q, k, v), (q, k, v), go)
    else:
        def call():
            with torch.no_grad():
                fn(q, k, v)
    return timer(device)(call, reps)


def table(device, dtype, reps, shapes):
    names = list(backends(device))
    for backward in (False, True):
        print(f"\n## {'forward+backward' if backward else 'forward'}, {dtype}, TFLOP/s (x = vs sdpa flash)")
        print(f"{'shape (B,H,Lq,Lk,D)':52s}" + "".join(f"{n:>22s}" for n in names))
        for name, shape in shapes.items():
            row, base = {}, None
            for n, fn in backends(device).items():
                try:
                    t = measure(fn, shape, dtype, device, reps, backward)
                    row[n] = flops(*shape, backward) / t / 1e12
                except (RuntimeError, ValueError) as e:  # a backend that does not take this shape/dtype
                    row[n] = None
                    if "out of memory" in str(e):
                        torch.cuda.empty_cache()
            base = row.get("sdpa flash")
            cells = []
            for n in names:
                x = row.get(n)
                cells.append("n/a" if x is None else f"{x:7.2f} ({x / base:4.2f}x)" if base else f"{x:7.2f}")
            print(f"{name + ' ' + str(shape):52s}" + "".join(f"{c:>22s}" for c in cells))


def cpu_report(reps):
    """No GPU: compiled Triton cannot run, and interpreter timings say nothing about speed. Measure
    what a CPU can: our processor's overhead vs diffusers' (same SDPA call underneath) on one
    SD1.5-like attention layer, and SDPA's CPU backends at reduced SD/DiT shapes."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from stepdistill.kernels.attention import FlashAttnProcessor

    print("note: no CUDA device: the Triton kernel's speed is not measured here (run on a GPU for the table)")
    print("\n## processor overhead: one Attention(320 ch, 8 heads x 40), B=1, 32x32 tokens + 77 text tokens, fp32")
    torch.manual_seed(0)
    for cross in (None, 768):
        attn = Attention(320, cross_attention_dim=cross, heads=8, dim_head=40)
        x = torch.randn(1, 1024, 320)
        ctx = torch.randn(1, 77, 768) if cross else None
        procs = [AttnProcessor2_0(), FlashAttnProcessor()]
        best = [float("inf")] * 2
        for _ in range(reps):  # interleaved, best of reps: the two differ only by Python-level code
            for i, proc in enumerate(procs):
                attn.set_processor(proc)
                with torch.no_grad():
                    best[i] = min(best[i], timer("cpu")(lambda: attn(x, encoder_hidden_states=ctx), 1))
        a, b = best
        print(f"{'cross' if cross else 'self '}: diffusers {a * 1e3:.2f} ms, ours {b * 1e3:.2f} ms, ratio {a / b:.2f}x")
    small = {k: (1, s[1], min(s[2], 1024), min(s[3], 1024), s[4]) for k, s in SHAPES.items()
             if k in ("SD1.5 32x32 self", "SD1.5 64x64 cross (77 tok)", "SD1.5 16x16 self", "DiT-XL/2 256px")}
    table("cpu", torch.float32, reps, small)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# attention, {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}")
    if args.device == "cuda":
        table("cuda", getattr(torch, args.dtype), args.reps or 20, SHAPES)
    else:
        cpu_report(args.reps or 5)


if __name__ == "__main__":
    main()
