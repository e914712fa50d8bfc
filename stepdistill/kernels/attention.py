"""Flash attention in Triton (online softmax, FlashAttention-2 style), forward and backward,
and diffusers attention processors that call it in place of scaled_dot_product_attention.

Layout is SDPA's: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides with a unit last stride,
so the processors pass their transposed views without copies. Non-causal only; Lk may differ
from Lq (cross-attention to text tokens); the head dim D (up to 256) is a compile-time value split
into two power-of-two tiles (head_split: 80 = 64 + 16, 160 = 128 + 32 without padding; 40 and 72
pad 8 masked columns), with 16-byte stride hints where the strides allow, so the loads vectorise
and go through cp.async on sm_80+ (benchmarks/inspect_sm90.py). The backward is FlashAttention-2's
five products in one kernel (dQ added atomically in fp32). An optional additive bias (or boolean
mask, True = attend) broadcastable to (B, H, Lq, Lk) is read through stride-0 views, never
materialised. Rows whose keys are all masked give 0 (SDPA's math backend also gives 0 in
recent PyTorch). The mask gets no gradient.

The kernels need Triton >= 3.0 (triton_problem() says why not) and run on CUDA (fp16, bf16, fp32)
and, for the tests, on CPU tensors under TRITON_INTERPRET=1 (fp32). Batch x heads is grid axis 0
(2^31 - 1 programs), sequence blocks axis 1 (checked against 65,535). Tiles are autotuned per
(length bucket, head-dim tiles, bias, dtype) over configs pruned by head dim, cached on disk.
`attention_reference` is the pure-torch ground truth.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive bias from a diffusers/SDPA mask: booleans (True = attend) become 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def attention_reference(q, k, v, mask=None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v computed plainly in q's dtype (use fp64 for a ground truth).

    Fully masked rows give 0, as the kernel does.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    bias = mask_to_bias(mask, s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    return (p / torch.where(denom == 0, torch.ones_like(denom), denom)) @ v


# ----------------------------------------------------------------------------- kernels

TRITON_MIN = (3, 0)


def triton_problem() -> str | None:
    """Why the Triton kernels cannot be used here (None when they can): absent or older than 3.0."""
    if not HAS_TRITON:
        return "the triton package is not installed"
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if version < TRITON_MIN:
        return (f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_MIN))}, which the kernels need "
                "(tl.dot input_precision); upgrade torch/triton (pip install 'triton>=3.0')")
    return None


def head_split(d: int) -> tuple[int, int]:
    """Head dim d as two power-of-two tiles (D0, D1): D0 the largest power of two <= d (at least 16,
    the smallest tl.dot operand), D1 the rest rounded up to a power of two >= 16, or 0.

    40 -> (32, 16), 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16), 160 -> (128, 32): 80 and 160 need no
    padding at all, 40 and 72 pad 8 columns (masked) instead of 24 and 56 for the next power of two.
    """
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (0 if rest == 0 else max(16, 1 << (rest - 1).bit_length()))


if HAS_TRITON:

    @triton.jit
    def _tile(base, rows, stride, row_mask, cols, COLS: tl.constexpr, MASK_COLS: tl.constexpr):
        """Load a (rows, cols) tile; the column mask only where the tile runs past the head dim."""
        ptrs = base + rows[:, None] * stride + cols[None, :]
        if MASK_COLS:
            return tl.load(ptrs, mask=row_mask[:, None] & (cols[None, :] < COLS), other=0.0)
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)

    @triton.jit
    def _store_tile(base, rows, stride, row_mask, cols, x, COLS: tl.constexpr, MASK_COLS: tl.constexpr):
        ptrs = base + rows[:, None] * stride + cols[None, :]
        if MASK_COLS:
            tl.store(ptrs, x, mask=row_mask[:, None] & (cols[None, :] < COLS))
        else:
            tl.store(ptrs, x, mask=row_mask[:, None])

    @triton.jit
    def _add_tile(base, rows, row_mask, cols, x, COLS: tl.constexpr, MASK_COLS: tl.constexpr):
        """Atomically add x into a contiguous (rows, COLS) fp32 buffer."""
        ptrs = base + rows[:, None] * COLS + cols[None, :]
        if MASK_COLS:
            tl.atomic_add(ptrs, x, mask=row_mask[:, None] & (cols[None, :] < COLS), sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, mask=row_mask[:, None], sem="relaxed")

    @triton.jit
    def _attn_fwd(Q, K, V, Bias, O, LSE,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sbb, sbh, sbm, sbn,
                  H, LQ, LK, qk_scale, LQ_KEY, LK_KEY,
                  HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
                  HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One (batch*head, query block): stream key blocks with a running max and sum (log2 domain).

        The head dim is two tiles, columns [0, D0) and [D0, D0 + D1) (D1 = 0: none), so 80 = 64 + 16
        loads and multiplies no padding. LQ_KEY/LK_KEY are unused here: the autotuner's shape buckets.
        """
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        # Strides arrive divided by ALIGN: multiplying by the constexpr tells the compiler they are
        # multiples of it (tl.multiple_of on a scalar argument does not), so the loads vectorise.
        sqb, sqh, sqm, skb, skh, skn = sqb * ALIGN, sqh * ALIGN, sqm * ALIGN, skb * ALIGN, skh * ALIGN, skn * ALIGN
        svb, svh, svn, sob, soh, som = svb * ALIGN, svh * ALIGN, svn * ALIGN, sob * ALIGN, soh * ALIGN, som * ALIGN
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        mask_m = offs_m < LQ
        q_base = Q + off_b * sqb + off_h * sqh
        k_base = K + off_b * skb + off_h * skh
        v_base = V + off_b * svb + off_h * svh
        b_base = Bias + off_b * sbb + off_h * sbh
        q = _tile(q_base, offs_m, sqm, mask_m, c0, HEAD_DIM, D0 > HEAD_DIM)
        acc = tl.zeros([BLOCK_M, D0], tl.float32)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            q1 = _tile(q_base, offs_m, sqm, mask_m, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
            acc1 = tl.zeros([BLOCK_M, D1], tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < LK
            k = _tile(k_base, cols, skn, mask_n, c0, HEAD_DIM, D0 > HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            if D1 > 0:
                k1 = _tile(k_base, cols, skn, mask_n, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
                s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
            s = s * qk_scale
            if HAS_BIAS:
                b = tl.load(b_base + offs_m[:, None] * sbm + cols[None, :] * sbn,
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                s += b.to(tl.float32) * 1.4426950408889634
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _tile(v_base, cols, svn, mask_n, c0, HEAD_DIM, D0 > HEAD_DIM)
            p = p.to(v.dtype)
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PREC)
            if D1 > 0:
                v1 = _tile(v_base, cols, svn, mask_n, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PREC)
            m_i = m_new

        empty = l_i == 0.0
        inv = 1.0 / tl.where(empty, 1.0, l_i)
        o_base = O + off_b * sob + off_h * soh
        _store_tile(o_base, offs_m, som, mask_m, c0, (acc * inv[:, None]).to(O.dtype.element_ty), HEAD_DIM,
                    D0 > HEAD_DIM)
        if D1 > 0:
            _store_tile(o_base, offs_m, som, mask_m, c1, (acc1 * inv[:, None]).to(O.dtype.element_ty), HEAD_DIM,
                        D0 + D1 > HEAD_DIM)
        # +inf for fully masked rows makes every backward probability exp2(s - lse) exactly 0.
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=mask_m)

    @triton.jit
    def _attn_bwd(Q, K, V, Bias, DO, LSE, Delta, DQ, DK, DV,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn,
                  H, LQ, LK, qk_scale, sm_scale, LQ_KEY, LK_KEY,
                  HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
                  HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One (batch*head, key block), streaming query blocks: FlashAttention-2's five products.

        S^T = K Q^T (P^T recomputed from the saved log-sum-exp), dV += P^T dO, dP^T = V dO^T,
        dS^T = P^T (dP^T - delta), dK += dS^T Q, and dQ += dS K added atomically into an fp32
        buffer (DQ, contiguous (B*H, LQ, HEAD_DIM), zeroed by the caller). delta = rowsum(dO * O).
        """
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        sqb, sqh, sqm, skb, skh, skn = sqb * ALIGN, sqh * ALIGN, sqm * ALIGN, skb * ALIGN, skh * ALIGN, skn * ALIGN
        svb, svh, svn, sdb, sdh, sdm = svb * ALIGN, svh * ALIGN, svn * ALIGN, sdb * ALIGN, sdh * ALIGN, sdm * ALIGN  # as fwd
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        c0 = tl.arange(0, D0)
        mask_n = offs_n < LK
        k_base = K + off_b * skb + off_h * skh
        v_base = V + off_b * svb + off_h * svh
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdb + off_h * sdh
        b_base = Bias + off_b * sbb + off_h * sbh
        row_base = pid_bh.to(tl.int64) * LQ
        dq_base = DQ + row_base * HEAD_DIM

        k = _tile(k_base, offs_n, skn, mask_n, c0, HEAD_DIM, D0 > HEAD_DIM)
        v = _tile(v_base, offs_n, svn, mask_n, c0, HEAD_DIM, D0 > HEAD_DIM)
        dk = tl.zeros([BLOCK_N, D0], tl.float32)
        dv = tl.zeros([BLOCK_N, D0], tl.float32)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            k1 = _tile(k_base, offs_n, skn, mask_n, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
            v1 = _tile(v_base, offs_n, svn, mask_n, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
            dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
            dv1 = tl.zeros([BLOCK_N, D1], tl.float32)

        for start_m in range(0, LQ, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < LQ
            q = _tile(q_base, rows, sqm, mask_m, c0, HEAD_DIM, D0 > HEAD_DIM)
            do = _tile(do_base, rows, sdm, mask_m, c0, HEAD_DIM, D0 > HEAD_DIM)
            lse = tl.load(LSE + row_base + rows, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta + row_base + rows, mask=mask_m, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC)  # 1: S^T, (BLOCK_N, BLOCK_M)
            if D1 > 0:
                q1 = _tile(q_base, rows, sqm, mask_m, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
                do1 = _tile(do_base, rows, sdm, mask_m, c1, HEAD_DIM, D0 + D1 > HEAD_DIM)
                st = tl.dot(k1, tl.trans(q1), st, input_precision=PREC)
            st = st * qk_scale
            if HAS_BIAS:
                b = tl.load(b_base + rows[None, :] * sbm + offs_n[:, None] * sbn,
                            mask=mask_n[:, None] & mask_m[None, :], other=0.0)
                st += b.to(tl.float32) * 1.4426950408889634
            pt = tl.math.exp2(st - lse[None, :])
            pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
            pt_lo = pt.to(do.dtype)
            dv = tl.dot(pt_lo, do, dv, input_precision=PREC)  # 2: dV += P^T dO
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # 3: dP^T = V dO^T
            if D1 > 0:
                dv1 = tl.dot(pt_lo, do1, dv1, input_precision=PREC)
                dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=PREC)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk = tl.dot(dst, q, dk, input_precision=PREC)  # 4: dK += dS^T Q
            ds = tl.trans(dst)
            dq = tl.dot(ds, k, input_precision=PREC)  # 5: dQ += dS K
            _add_tile(dq_base, rows, mask_m, c0, dq, HEAD_DIM, D0 > HEAD_DIM)
            if D1 > 0:
                dk1 = tl.dot(dst, q1, dk1, input_precision=PREC)
                dq1 = tl.dot(ds, k1, input_precision=PREC)
                _add_tile(dq_base, rows, mask_m, c1, dq1, HEAD_DIM, D0 + D1 > HEAD_DIM)

        dk_base = DK + off_b * skb + off_h * skh
        dv_base = DV + off_b * svb + off_h * svh
        _store_tile(dk_base, offs_n, skn, mask_n, c0, (dk * sm_scale).to(DK.dtype.element_ty), HEAD_DIM,
                    D0 > HEAD_DIM)
        _store_tile(dv_base, offs_n, svn, mask_n, c0, dv.to(DV.dtype.element_ty), HEAD_DIM, D0 > HEAD_DIM)
        if D1 > 0:
            _store_tile(dk_base, offs_n, skn, mask_n, c1, (dk1 * sm_scale).to(DK.dtype.element_ty), HEAD_DIM,
                        D0 + D1 > HEAD_DIM)
            _store_tile(dv_base, offs_n, svn, mask_n, c1, dv1.to(DV.dtype.element_ty), HEAD_DIM,
                        D0 + D1 > HEAD_DIM)

    def _configs(pairs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # Candidate tiles (BLOCK_M, BLOCK_N, warps, stages), pruned by head dim before any timing.
    _FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                             (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)])
    _BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2),
                             (32, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1)])
    SMEM_BUDGET = 160 * 1024  # bytes: below A100's 164 KB and H100's 227 KB per block

    def _smem_estimate(cfg, d: int, backward: bool) -> int:
        """Shared memory of a config at 2 bytes per element, fitted to what triton.compile reports for
        sm_90 (benchmarks/inspect_sm90.py): forward Q plus a K and a V tile per stage; backward four
        key-block tiles plus a Q and a dO tile per stage."""
        m, n, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
        if backward:
            return 2 * (4 * n * d + stages * 2 * m * d)
        return 2 * (m * d + stages * 2 * n * d)

    def prune_configs(configs, named_args, backward=False, **kwargs):
        """Keep the configs whose tiles fit shared memory at this head dim, and for head dims <= 64
        only the wide ones (small tiles lose there); the largest-tile survivor if none is left."""
        d = kwargs["D0"] + kwargs["D1"]
        keep = [c for c in configs if _smem_estimate(c, d, backward) <= SMEM_BUDGET]
        if d <= 64:
            keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 64 * 32] or keep
        return keep or [min(configs, key=lambda c: _smem_estimate(c, d, backward))]

    def _prune_bwd(configs, named_args, **kwargs):
        return prune_configs(configs, named_args, backward=True, **kwargs)

    # Tuned once per (length buckets, head-dim tiles, bias, dtype) and cached on disk (cache_results):
    # a new sequence length inside a bucket, or another rank on the same machine, reuses the result.
    _KEY = ["LQ_KEY", "LK_KEY", "D0", "D1", "HAS_BIAS"]
    _DISK = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    _attn_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": prune_configs},
                                      **_DISK)(_attn_fwd)
    _attn_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd},
                                      reset_to_zero=["DQ"], **_DISK)(_attn_bwd)

INTERPRETER_BLOCK = 16  # small blocks so the tests cross block edges with tiny shapes
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2; batch*heads go on axis 0 (2^31 - 1)
MIN_BLOCK = 16


def length_bucket(n: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, at least 64."""
    return max(64, 1 << max(0, n - 1).bit_length())


def stride_alignment(*tensors: torch.Tensor) -> int:
    """8 when every batch, head and row stride is a multiple of 8 elements (16 bytes at 2-byte
    elements), else 1.

    Triton infers alignment 16 of integer arguments by itself, not 8: at head dim 40 (strides 40,
    8 x 40 = 320) the loads would go element by element. The kernels take the strides divided by
    this and multiply back by the constexpr, which the compiler can see.
    """
    return 8 if all(s % 8 == 0 for t in tensors for s in t.stride()[:3]) else 1


def _strides(t: torch.Tensor, align: int) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, L, D) tensor divided by `align`."""
    return tuple(s // align for s in t.stride()[:3])


def check_grid(bh: int, lq: int, lk: int) -> None:
    """Sequence blocks go on grid axis 1, capped at 65,535 blocks; refuse longer inputs clearly."""
    longest = max(lq, lk)
    if -(-longest // MIN_BLOCK) > MAX_GRID_Y:
        raise ValueError(f"flash_attention: sequence length {longest} needs more than {MAX_GRID_Y} blocks of "
                         f"{MIN_BLOCK} on a grid axis; use SDPA (kernels.attention=sdpa) for sequences this long")
    if bh >= 2 ** 31:
        raise ValueError(f"flash_attention: batch x heads = {bh} exceeds the grid's 2^31 - 1")


def _launch(tuned, plain, blocks: Callable[[int, int], int], bh: int, args, **meta):
    """Run the autotuned kernel on CUDA, or the plain one with fixed blocks in the interpreter."""
    if interpreting():
        b = INTERPRETER_BLOCK
        plain[(bh, blocks(b, b))](*args, BLOCK_M=b, BLOCK_N=b, **meta)
    else:
        tuned[lambda m: (bh, blocks(m["BLOCK_M"], m["BLOCK_N"]))](*args, **meta)


def _bias_view(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor):
    """The bias as a stride-0 broadcast view to (B, H, Lq, Lk), and its strides (zeros if none)."""
    if bias is None:
        return q, (0, 0, 0, 0)  # q stands in for an unused pointer
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    bias = bias.expand(b, h, lq, lk)
    return bias, tuple(bias.stride())


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q, bias, align: int) -> dict:
    d = q.shape[-1]
    d0, d1 = head_split(d)
    return dict(HEAD_DIM=d, D0=d0, D1=d1, ALIGN=align, HAS_BIAS=bias is not None,
                PREC="ieee" if q.dtype == torch.float32 else None)  # None: the backend default for fp16/bf16


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the per-row log-sum-exp; recomputes P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        b, h, lq, d = q.shape
        lk = k.shape[2]
        check_grid(b * h, lq, lk)
        # O is laid out (B, Lq, H, D) so that the processors' transpose(1, 2).reshape is free.
        o = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
        bias_t, sb = _bias_view(bias, q, k)
        a = stride_alignment(q, k, v, o)
        args = (q, k, v, bias_t, o, lse, *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(o, a), *sb,
                h, lq, lk, scale * LOG2E, length_bucket(lq), length_bucket(lk))
        _launch(_attn_fwd_tuned, _attn_fwd, lambda m, n: triton.cdiv(lq, m), b * h, args, **_meta(q, bias, a))
        ctx.save_for_backward(q, k, v, o, lse, bias)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, bias = ctx.saved_tensors
        do = _unit_last(do)
        b, h, lq, d = q.shape
        lk = k.shape[2]
        delta = (do.float() * o.float()).sum(-1).reshape(b * h, lq)
        dq_acc = torch.zeros(b, h, lq, d, dtype=torch.float32, device=q.device)
        # dK, dV share their input's strides: the kernel addresses both with one set of strides.
        dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (k, v))
        bias_t, sb = _bias_view(bias, q, k)
        a = stride_alignment(q, k, v, do)
        args = (q, k, v, bias_t, do, lse, delta, dq_acc, dk, dv, *_strides(q, a), *_strides(k, a), *_strides(v, a),
                *_strides(do, a), *sb, h, lq, lk, ctx.scale * LOG2E, ctx.scale, length_bucket(lq), length_bucket(lk))
        _launch(_attn_bwd_tuned, _attn_bwd, lambda m, n: triton.cdiv(lk, n), b * h, args, **_meta(q, bias, a))
        return (dq_acc * ctx.scale).to(q.dtype), dk, dv, None, None


def flash_attention(q, k, v, mask=None, scale: float | None = None) -> torch.Tensor:
    """Triton attention with SDPA's arguments (B, H, L, D); differentiable in q, k and v."""
    problem = triton_problem()
    if problem:
        raise RuntimeError(f"flash_attention cannot run: {problem}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention expects q (B,H,Lq,D), k=v (B,H,Lk,D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if mask is not None and mask.requires_grad:
        raise ValueError("flash_attention gives no gradient to the mask; detach it or use SDPA")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, mask_to_bias(mask, q.dtype), scale)


# ----------------------------------------------------------------------------- processors

Attend = Callable[..., torch.Tensor]  # (q, k, v, mask) -> out, SDPA layout and semantics


def sdpa_attend(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


class FlashAttnProcessor:
    """AttnProcessor2_0 with a pluggable attention call: same norms, residual and rescaling.

    `attend(q, k, v, mask)` takes SDPA's layout; see stepdistill.kernels.dispatch for the backends.
    """

    def __init__(self, attend: Attend = sdpa_attend, backend: str = "sdpa"):
        self.attend = attend
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FlashJointAttnProcessor:
    """JointAttnProcessor2_0 (SD3's MM-DiT block) with a pluggable attention call: the image and
    context tokens are projected, qk-normed and concatenated, attended jointly, then split."""

    def __init__(self, attend: Attend = sdpa_attend, backend: str = "sdpa"):
        self.attend = attend
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            def heads(x):
                return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            ctx_q = heads(attn.add_q_proj(encoder_hidden_states))
            ctx_k = heads(attn.add_k_proj(encoder_hidden_states))
            ctx_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        # JointAttnProcessor2_0 ignores attention_mask; so do we, to stay identical.
        hidden_states = self.attend(query, key, value, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
