"""Flash attention in Triton (online softmax, FlashAttention-2 style), forward and backward,
and diffusers attention processors that call it in place of scaled_dot_product_attention.

Layout is SDPA's: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides with a unit last stride,
so the processors pass their transposed views without copies. Non-causal only; Lk may differ
from Lq (cross-attention to text tokens); D up to 256 is padded inside the kernel to a power of
two (>= 16) with masked loads, so 40, 80 and 160 work. An optional additive bias (or boolean
mask, True = attend) broadcastable to (B, H, Lq, Lk) is read through stride-0 views, never
materialised. Rows whose keys are all masked give 0 (SDPA's math backend also gives 0 in
recent PyTorch). The mask gets no gradient.

The kernels run on CUDA (fp16, bf16, fp32) and, for the tests, on CPU tensors under
TRITON_INTERPRET=1 (fp32). `attention_reference` is the pure-torch ground truth.
"""

from __future__ import annotations

import os
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

if HAS_TRITON:

    @triton.jit
    def _attn_fwd(Q, K, V, Bias, O, LSE,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sbb, sbh, sbm, sbn,
                  H, LQ, LK, D, qk_scale,
                  HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (query block, batch*head): stream key blocks with a running max and sum (log2 domain)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < LQ
        mask_d = offs_d < D

        q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        k_base = K + off_b * skb + off_h * skh
        v_base = V + off_b * svb + off_h * svh
        b_base = Bias + off_b * sbb + off_h * sbh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < LK
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
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
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new

        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        # +inf for fully masked rows makes every backward probability exp2(s - lse) exactly 0.
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=mask_m)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, Bias, DO, LSE, Delta, DK, DV,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn,
                       H, LQ, LK, D, qk_scale, sm_scale,
                       HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (key block, batch*head): dV = P^T dO and dK = scale * dS^T Q, streaming query blocks."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < LK
        mask_d = offs_d < D
        kv_mask = mask_n[:, None] & mask_d[None, :]

        k = tl.load(K + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + off_b * svb + off_h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdb + off_h * sdh
        b_base = Bias + off_b * sbb + off_h * sbh
        row_base = pid_bh.to(tl.int64) * LQ

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, LQ, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < LQ
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta + row_base + rows, mask=mask_m, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # S^T, (BLOCK_N, BLOCK_M)
            if HAS_BIAS:
                b = tl.load(b_base + rows[None, :] * sbm + offs_n[:, None] * sbn,
                            mask=mask_n[:, None] & mask_m[None, :], other=0.0)
                st += b.to(tl.float32) * 1.4426950408889634
            pt = tl.math.exp2(st - lse[None, :])
            pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)

        tl.store(DK + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + off_b * svb + off_h * svh + offs_n[:, None] * svn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, Bias, DO, LSE, Delta, DQ,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn,
                     H, LQ, LK, D, qk_scale, sm_scale,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (query block, batch*head): dQ = scale * dS K, streaming key blocks (no atomics)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < LQ
        mask_d = offs_d < D
        q_mask = mask_m[:, None] & mask_d[None, :]

        q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=q_mask, other=0.0)
        row_base = pid_bh.to(tl.int64) * LQ
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
        k_base = K + off_b * skb + off_h * skh
        v_base = V + off_b * svb + off_h * svh
        b_base = Bias + off_b * sbb + off_h * sbh

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < LK
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if HAS_BIAS:
                b = tl.load(b_base + offs_m[:, None] * sbm + cols[None, :] * sbn,
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                s += b.to(tl.float32) * 1.4426950408889634
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

        tl.store(DQ + off_b * sqb + off_h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)

    def _configs(pairs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # On CUDA the block shapes are autotuned per (Lq, Lk, head dim); shapes that run out of shared
    # memory (large head dims) are dropped by the autotuner. The interpreter uses fixed small blocks.
    _FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                             (64, 32, 4, 2), (32, 32, 4, 2)])
    _BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2),
                             (32, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1)])
    _KEY = ["LQ", "LK", "D"]
    _attn_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY)(_attn_fwd)
    _attn_bwd_dkdv_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY)(_attn_bwd_dkdv)
    _attn_bwd_dq_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY)(_attn_bwd_dq)

INTERPRETER_BLOCK = 16  # small blocks so the tests cross block edges with tiny shapes


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _launch(tuned, plain, grid_dim: Callable[[int, int], int], bh: int, args, **meta):
    """Run the autotuned kernel on CUDA, or the plain one with fixed blocks in the interpreter."""
    if interpreting():
        b = INTERPRETER_BLOCK
        plain[(grid_dim(b, b), bh)](*args, BLOCK_M=b, BLOCK_N=b, **meta)
    else:
        tuned[lambda m: (grid_dim(m["BLOCK_M"], m["BLOCK_N"]), bh)](*args, **meta)


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


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the per-row log-sum-exp; recomputes P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        b, h, lq, d = q.shape
        lk = k.shape[2]
        # O is laid out (B, Lq, H, D) so that the processors' transpose(1, 2).reshape is free.
        o = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
        bias_t, sb = _bias_view(bias, q, k)
        prec = "ieee" if q.dtype == torch.float32 else None  # None: the backend default for fp16/bf16
        args = (q, k, v, bias_t, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *sb,
                h, lq, lk, d, scale * LOG2E)
        _launch(_attn_fwd_tuned, _attn_fwd, lambda m, n: triton.cdiv(lq, m), b * h, args,
                HAS_BIAS=bias is not None, PREC=prec, BLOCK_D=_block_d(d))
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
        # Gradients share their input's strides: the kernels address both with one set of strides.
        dq, dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))
        bias_t, sb = _bias_view(bias, q, k)
        prec = "ieee" if q.dtype == torch.float32 else None  # None: the backend default for fp16/bf16
        meta = dict(HAS_BIAS=bias is not None, PREC=prec, BLOCK_D=_block_d(d))
        common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *sb,
                  h, lq, lk, d, ctx.scale * LOG2E, ctx.scale)
        _launch(_attn_bwd_dkdv_tuned, _attn_bwd_dkdv, lambda m, n: triton.cdiv(lk, n), b * h,
                (q, k, v, bias_t, do, lse, delta, dk, dv, *common), **meta)
        _launch(_attn_bwd_dq_tuned, _attn_bwd_dq, lambda m, n: triton.cdiv(lq, m), b * h,
                (q, k, v, bias_t, do, lse, delta, dq, *common), **meta)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, mask=None, scale: float | None = None) -> torch.Tensor:
    """Triton attention with SDPA's arguments (B, H, L, D); differentiable in q, k and v."""
    if not HAS_TRITON:
        raise RuntimeError("flash_attention needs triton")
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
