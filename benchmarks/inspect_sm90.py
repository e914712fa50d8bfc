"""Compile the Triton attention kernels for sm_90 (H100) without a GPU and count what the PTX holds.

  python benchmarks/inspect_sm90.py            # the current kernels
  python benchmarks/inspect_sm90.py --old REV  # also the kernels at git revision REV (e.g. main), for comparison

For each head dim: whether the forward and backward compile (through ptxas to a cubin), the shared
memory they take, and counts in the PTX of global loads (scalar / vectorised
ld.global.v2 / v4), cp.async copies, mma.sync and wgmma instructions. The arguments are specialised
as the JIT would for SD1.5's layout (q as a transposed view of (B, L, H, D), B=2, H=8, L=4096):
16-byte aligned pointers, and `tt.divisibility` 16 on the strides that are multiples of 16.
Runs on a CPU: triton.compile with GPUTarget("cuda", 90, 32) needs no driver.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, never the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HEAD_DIMS = (40, 64, 72, 80, 128, 160)
B, H, L = 2, 8, 4096
FWD_TILE = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
BWD_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
BIG_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}  # head dims > 128
ROW_STRIDES = tuple("sqb sqh sqm skb skh skn svb svh svn sob soh som sdb sdh sdm".split())
PATTERNS = {
    "ld.global scalar": r"ld\.global(?:\.[a-z]+)*\.(?:b16|b32|b64|u16|u32|f32)\s",
    "ld.global.v2": r"ld\.global(?:\.[a-z]+)*\.v2\.",
    "ld.global.v4": r"ld\.global(?:\.[a-z]+)*\.v4\.",
    "cp.async": r"cp\.async\.c[ag]\.shared",
    "cp.async.bulk (TMA)": r"cp\.async\.bulk",
    "mma.sync": r"mma\.sync",
    "wgmma": r"wgmma\.mma_async",
}


def load_module(rev: str | None):
    """stepdistill.kernels.attention now, or as it was at git revision `rev` (a temporary copy)."""
    if rev is None:
        from stepdistill.kernels import attention

        return attention
    src = subprocess.run(["git", "show", f"{rev}:stepdistill/kernels/attention.py"], capture_output=True, text=True,
                         check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"attention_{re.sub(r'[^A-Za-z0-9]', '_', rev)}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def arg_values(d: int) -> dict:
    """Runtime argument values for SD1.5's self-attention layout at head dim d (for the specialisation)."""
    sq = (L * H * d, d, H * d)  # (B, L, H, D) viewed as (B, H, L, D)
    sk = (H * L * d, L * d, d)  # contiguous (B, H, L, D)
    return dict(zip("sqb sqh sqm skb skh skn svb svh svn sob soh som sdb sdh sdm sbb sbh sbm sbn".split(),
                    (*sq, *sk, *sk, *sq, *sq, 0, 0, 0, 0))) | {"H": H, "LQ": L, "LK": L, "LQ_KEY": L, "LK_KEY": L,
                                                                 "D": d}  # D: the old kernels' runtime head dim


def compile_kernel(fn, constexprs: dict, d: int, tile: dict):
    """triton.compile for sm_90 with the JIT's argument specialisation; (compiled, seconds)."""
    values = arg_values(d)
    align = constexprs.get("ALIGN", 1)  # the current kernels take strides divided by ALIGN
    values = {k: (v // align if k in ROW_STRIDES else v) for k, v in values.items()}
    signature, attrs = {}, {}
    tile_meta = {k: v for k, v in tile.items() if k.startswith("BLOCK")}
    consts = {**constexprs, **tile_meta}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in values:
            signature[name] = "i32"
            if values[name] % 16 == 0 and values[name] != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name in ("LSE", "Delta") or (name == "DQ" and "D0" in constexprs):
            signature[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # tensors
            signature[name] = "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    start = time.perf_counter()
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
    return out, time.perf_counter() - start


def counts(ptx: str) -> dict:
    return {name: len(re.findall(p, ptx)) for name, p in PATTERNS.items()}


def kernels_of(mod, d: int):
    """(label, jit function, constexprs, tile) for the forward and backward kernels of `mod`."""
    big = d > 128
    if hasattr(mod, "head_split"):  # the current kernels: head dim split into constexpr tiles
        d0, d1 = mod.head_split(d)
        meta = dict(HEAD_DIM=d, D0=d0, D1=d1, ALIGN=8 if d % 8 == 0 else 1, HAS_BIAS=False, PREC=None)
        return [("fwd", mod._attn_fwd, meta, BIG_TILE if big else FWD_TILE),
                ("bwd (5 products)", mod._attn_bwd, meta, BIG_TILE if big else BWD_TILE)]
    meta = dict(HAS_BIAS=False, PREC=None, BLOCK_D=mod._block_d(d))
    return [("fwd", mod._attn_fwd, meta, BIG_TILE if big else FWD_TILE),
            ("bwd dk/dv", mod._attn_bwd_dkdv, meta, BIG_TILE if big else BWD_TILE),
            ("bwd dq", mod._attn_bwd_dq, meta, BIG_TILE if big else BWD_TILE)]


def report(mod, label: str) -> None:
    print(f"\n## {label} (triton {triton.__version__}, sm_90, bf16, B={B} H={H} L={L})\n")
    cols = list(PATTERNS)
    print("| head dim | kernel | tiles | compiles | smem KB | " + " | ".join(cols) + " |")
    print("|" + "---|" * (5 + len(cols)))
    for d in HEAD_DIMS:
        for name, fn, meta, tile in kernels_of(mod, d):
            tiles = (f"D {meta['D0']}+{meta['D1']}" if "D0" in meta else f"D pad {meta['BLOCK_D']}") + \
                f", {tile['BLOCK_M']}x{tile['BLOCK_N']}"
            try:
                out, secs = compile_kernel(fn, meta, d, tile)
            except Exception as e:  # report, keep going
                msg = str(e).strip().splitlines()[-1][:80] if str(e).strip() else type(e).__name__
                print(f"| {d} | {name} | {tiles} | no: {msg} |" + " |" * (1 + len(cols)))
                continue
            c = counts(out.asm["ptx"])
            md = out.metadata
            print(f"| {d} | {name} | {tiles} | yes ({secs:.1f} s) | {md.shared / 1024:.0f} | " + " | ".join(str(c[k]) for k in cols) + " |")
            sys.stdout.flush()


def report_ema(rev: str | None) -> None:
    """The fused EMA kernel (3 rates, bf16 live, BLOCK 1024) with and without its alignment hint."""
    if rev is None:
        from stepdistill.kernels import ema
    else:
        src = subprocess.run(["git", "show", f"{rev}:stepdistill/kernels/ema.py"], capture_output=True, text=True,
                             check=True).stdout
        import stepdistill.kernels as pkg

        ema = type(sys)("stepdistill.kernels._ema_" + re.sub(r"[^A-Za-z0-9]", "_", rev))
        ema.__package__ = pkg.__name__
        path = os.path.join(tempfile.mkdtemp(), "ema_old.py")
        with open(path, "w") as f:
            f.write(src)
        exec(compile(src, path, "exec"), ema.__dict__)
    sig = {"live_base": "*bf16", "live_off_ptr": "*i64", "flat_ptr": "*fp32", "flat_off_ptr": "*i64",
           "len_ptr": "*i32", "row1": "i64", "row2": "i64", "row3": "i64", "w0": "fp32", "w1": "fp32", "w2": "fp32",
           "w3": "fp32", "NUM_RATES": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    print(f"\n## fused EMA kernel {'at ' + rev if rev else '(current)'} (sm_90, bf16 live, 3 rates, BLOCK 1024)\n")
    print("| ALIGNED | ld.global scalar | ld.global.v4 | st.global scalar | st.global.v4 |")
    print("|---|---|---|---|---|")
    for aligned in (False, True):
        src = ASTSource(fn=ema._ema_kernel, signature=sig, constexprs={"NUM_RATES": 3, "BLOCK": 1024,
                                                                        "ALIGNED": aligned}, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        c = counts(ptx)
        st_s = len(re.findall(r"st\.global(?:\.[a-z]+)*\.(?:b16|b32)\s", ptx))
        st_v = len(re.findall(r"st\.global(?:\.[a-z]+)*\.v4\.", ptx))
        print(f"| {aligned} | {c['ld.global scalar']} | {c['ld.global.v4']} | {st_s} | {st_v} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=None, help="also compile the kernels at this git revision (e.g. main)")
    args = ap.parse_args()
    if args.old:
        report(load_module(args.old), f"kernels at {args.old}")
        report_ema(args.old)
    report(load_module(None), "current kernels")
    report_ema(None)


if __name__ == "__main__":
    main()
