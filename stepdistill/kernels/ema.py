"""Multi-rate EMA updates of a student's trainable parameters, all rates in one pass over memory.

For every rate r: shadow_r <- decay_r * shadow_r + (1 - decay_r) * live, with fp32 shadows of
fp32, bf16 or fp16 live parameters. Both updaters first move the shadows into one flat fp32
buffer per (device, live dtype) bucket and rate, and re-point each shadow parameter's
`.data` at its slice, so the shadow modules keep seeing the values while the update streams
contiguous memory. The live parameters stay where they are (the optimizer owns them).

- FusedMultiRateEMA: one Triton launch per bucket (up to 4 rates per launch). Each program
  takes one chunk of one live tensor through a table of element offsets, reads the live values
  once and updates every rate. CUDA, or CPU tensors under TRITON_INTERPRET=1 (the tests).
  Rates are allocated one at a time (separate rows addressed by offsets), so building the
  buckets needs only one rate's worth of extra memory while the old shadows are released.
- BlockedMultiRateEMA: the CPU path. Walks each bucket in cache-sized blocks: gathers the block's
  live values once into a small fp32 scratch that stays in cache (large fp32 tensors are read in
  place), then one lerp_ per rate on the contiguous shadow slice. No per-step allocation of fp32
  copies of bf16 parameters, and the live block is read from memory once for all rates.

`multi_rate_ema_reference` is the plain per-tensor formula both are tested against.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import StepdistillError
from .attention import HAS_TRITON, interpreting, triton_problem

if HAS_TRITON:
    import triton
    import triton.language as tl

ALIGN = 16  # elements: every tensor starts its slice of the flat buffer on a 64-byte boundary
MAX_RATES_PER_LAUNCH = 4


@torch.no_grad()
def multi_rate_ema_reference(live, shadows, decays) -> None:
    """shadow = decay * shadow + (1 - decay) * live, tensor by tensor, in fp32 (in place)."""
    for rate_shadows, decay in zip(shadows, decays):
        for s, p in zip(rate_shadows, live):
            s.copy_(decay * s + (1.0 - decay) * p.detach().float())


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill numel() consecutive slots in some order."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


class _Bucket:
    """Live tensors of one (device, dtype) and their shadows packed in one flat fp32 row per rate."""

    def __init__(self, live: list[torch.Tensor], shadows: list[list[torch.Tensor]]):
        self.live = live
        self.shadows = shadows  # [rate][i]
        self.offsets = []
        n = 0
        for p in live:
            self.offsets.append(n)
            n += -(-p.numel() // ALIGN) * ALIGN
        self.numel = n
        self.rows: list[torch.Tensor] = []
        for _ in shadows:  # one rate at a time: its old tensors are freed as their shadows move
            self.rows.append(torch.zeros(n, dtype=torch.float32, device=live[0].device))
            self.attach(len(self.rows) - 1)

    def view(self, r: int, i: int) -> torch.Tensor:
        p = self.live[i]
        return torch.as_strided(self.rows[r], p.shape, p.stride(), self.offsets[i])

    @torch.no_grad()
    def attach(self, r: int) -> None:
        """Point rate r's shadows' .data at their slices, copying values in where they live elsewhere."""
        for i, s in enumerate(self.shadows[r]):
            v = self.view(r, i)
            if s.data_ptr() == v.data_ptr() and s.stride() == v.stride():
                continue
            v.copy_(s.detach().clone() if s.data_ptr() == v.data_ptr() else s.detach())
            s.data = v

    def live_ptrs(self) -> list[int]:
        return [p.data_ptr() for p in self.live]


class _FlatEMA:
    """Shared set-up: validation, bucketing by (device, live dtype), flat shadow buffers."""

    def __init__(self, live: list[torch.Tensor], shadows: list[list[torch.Tensor]]):
        if any(len(rs) != len(live) for rs in shadows):
            raise ValueError("every rate needs one shadow per live parameter")
        self.num_rates = len(shadows)
        groups: dict = defaultdict(list)
        self.loose: list[int] = []  # updated tensor by tensor: layouts the flat path cannot mirror
        for i, p in enumerate(live):
            for rs in shadows:
                s = rs[i]
                if s.dtype != torch.float32 or s.shape != p.shape or s.device != p.device:
                    raise ValueError(f"shadow {i} must be an fp32 tensor shaped and placed like its live "
                                     f"parameter {tuple(p.shape)} {p.device}; got {s.dtype} {tuple(s.shape)} {s.device}")
            if _dense(p) and p.numel() > 0:
                groups[(p.device, p.dtype)].append(i)
            else:
                self.loose.append(i)
        self.live = live
        self.shadows = shadows
        self.buckets = [_Bucket([live[i] for i in idx], [[rs[i] for i in idx] for rs in shadows])
                        for idx in groups.values()]
        for b in self.buckets:
            self._plan(b)

    def _plan(self, bucket: _Bucket) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        """Re-attach shadows whose .data was replaced (a load with assign=True, .to()), re-read live addresses."""
        for b in self.buckets:
            for r in range(len(b.rows)):
                b.attach(r)
            self._plan(b)

    @torch.no_grad()
    def _step_loose(self, weights: list[float]) -> None:
        for i in self.loose:
            x = self.live[i].detach().float()
            for rs, w in zip(self.shadows, weights):
                rs[i].lerp_(x, w)

    def _current(self, bucket: _Bucket) -> None:
        """Re-plan if a live parameter's storage moved since the plan was made (cheap pointer check)."""
        if bucket.live_ptrs() != bucket.ptrs:
            self._plan(bucket)


class FusedMultiRateEMA(_FlatEMA):
    """All rates in one Triton launch per bucket; see the module docstring."""

    def __init__(self, live: list[torch.Tensor], shadows: list[list[torch.Tensor]], chunk: int = 8192,
                 block: int = 1024):
        problem = triton_problem()
        if problem:
            raise StepdistillError(f"kernels.ema = 'fused' cannot run: {problem}; set kernels.ema=auto or foreach")
        bad = [p.device for p in live if not (p.is_cuda or (p.device.type == "cpu" and interpreting()))]
        if bad:
            raise StepdistillError(f"kernels.ema = 'fused' needs the parameters on a CUDA device (found {bad[0]}); "
                                   "set kernels.ema=auto or foreach on this machine")
        self.chunk = chunk
        self.block = block
        super().__init__(live, shadows)

    def _plan(self, b: _Bucket) -> None:
        """Chunk table: live element offset (from the bucket's first tensor), flat offset, length."""
        base = b.live[0].data_ptr()
        size = b.live[0].element_size()
        live_off, flat_off, lengths = [], [], []
        for p, off in zip(b.live, b.offsets):
            delta = p.data_ptr() - base
            if delta % size:
                raise RuntimeError("live parameters are not aligned to their element size")
            for start in range(0, p.numel(), self.chunk):
                live_off.append(delta // size + start)
                flat_off.append(off + start)
                lengths.append(min(self.chunk, p.numel() - start))
        dev = b.live[0].device
        b.table = (torch.tensor(live_off, dtype=torch.int64, device=dev),
                   torch.tensor(flat_off, dtype=torch.int64, device=dev),
                   torch.tensor(lengths, dtype=torch.int32, device=dev))
        b.aligned = all(o % ALIGN == 0 for o in live_off)  # flat offsets always are
        b.ptrs = b.live_ptrs()
        b.base = b.live[0]

    @torch.no_grad()
    def step(self, decays: list[float]) -> None:
        weights = [1.0 - float(d) for d in decays]
        if len(weights) != self.num_rates:
            raise ValueError(f"expected {self.num_rates} decays, got {len(weights)}")
        for b in self.buckets:
            self._current(b)
            live_off, flat_off, lengths = b.table
            for r0 in range(0, self.num_rates, MAX_RATES_PER_LAUNCH):
                w = weights[r0:r0 + MAX_RATES_PER_LAUNCH]
                w_args = w + [0.0] * (MAX_RATES_PER_LAUNCH - len(w))
                rows = b.rows[r0:r0 + MAX_RATES_PER_LAUNCH]
                # the other rows as element offsets from the first (each row is its own allocation)
                row_off = [(r.data_ptr() - rows[0].data_ptr()) // 4 for r in rows[1:]]
                row_off += [0] * (MAX_RATES_PER_LAUNCH - 1 - len(row_off))
                _ema_kernel[(live_off.numel(),)](
                    b.base, live_off, rows[0], flat_off, lengths, *row_off, *w_args,
                    NUM_RATES=len(w), BLOCK=self.block, ALIGNED=b.aligned, num_warps=4)
        self._step_loose(weights)


if HAS_TRITON:

    @triton.jit
    def _lerp_rows(live_ptr, ptr, row1, row2, row3, w0, w1, w2, w3, mask, NUM_RATES: tl.constexpr,
                   MASKED: tl.constexpr):
        """Read one block of live values once and lerp up to four shadow rows toward it."""
        if MASKED:
            x = tl.load(live_ptr, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(ptr, mask=mask, other=0.0)
            tl.store(ptr, s + w0 * (x - s), mask=mask)
            if NUM_RATES > 1:
                s = tl.load(ptr + row1, mask=mask, other=0.0)
                tl.store(ptr + row1, s + w1 * (x - s), mask=mask)
            if NUM_RATES > 2:
                s = tl.load(ptr + row2, mask=mask, other=0.0)
                tl.store(ptr + row2, s + w2 * (x - s), mask=mask)
            if NUM_RATES > 3:
                s = tl.load(ptr + row3, mask=mask, other=0.0)
                tl.store(ptr + row3, s + w3 * (x - s), mask=mask)
        else:
            x = tl.load(live_ptr).to(tl.float32)
            s = tl.load(ptr)
            tl.store(ptr, s + w0 * (x - s))
            if NUM_RATES > 1:
                s = tl.load(ptr + row1)
                tl.store(ptr + row1, s + w1 * (x - s))
            if NUM_RATES > 2:
                s = tl.load(ptr + row2)
                tl.store(ptr + row2, s + w2 * (x - s))
            if NUM_RATES > 3:
                s = tl.load(ptr + row3)
                tl.store(ptr + row3, s + w3 * (x - s))

    @triton.jit
    def _ema_kernel(live_base, live_off_ptr, flat_ptr, flat_off_ptr, len_ptr, row1, row2, row3, w0, w1, w2, w3,
                    NUM_RATES: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        """One chunk of one live tensor: full blocks unmasked (vector loads and stores where the offsets
        are aligned), then at most one masked tail block."""
        c = tl.program_id(0)
        live_off = tl.load(live_off_ptr + c)
        flat_off = tl.load(flat_off_ptr + c)
        n = tl.load(len_ptr + c)
        if ALIGNED:
            live_off = tl.multiple_of(live_off, 16)
            flat_off = tl.multiple_of(flat_off, 16)
        offs = tl.arange(0, BLOCK)
        full = n - n % BLOCK
        for start in range(0, full, BLOCK):
            o = start + offs
            _lerp_rows(live_base + live_off + o, flat_ptr + flat_off + o, row1, row2, row3, w0, w1, w2, w3, None,
                       NUM_RATES, False)
        if full < n:
            o = full + offs
            _lerp_rows(live_base + live_off + o, flat_ptr + flat_off + o, row1, row2, row3, w0, w1, w2, w3, o < n,
                       NUM_RATES, True)


class BlockedMultiRateEMA(_FlatEMA):
    """The CPU path: cache-sized blocks, live gathered once per block, one lerp_ per rate.

    2^19 elements (2 MB of fp32 scratch) measured best on a 2-core EPYC among 2^17..2^22.
    """

    def __init__(self, live: list[torch.Tensor], shadows: list[list[torch.Tensor]], block: int = 1 << 19):
        self.block = block
        super().__init__(live, shadows)

    def _plan(self, b: _Bucket) -> None:
        """Blocks of at most `block` flat elements: (live pieces, their scratch slices, a direct source
        or None, the scratch, the shadow rows' slices).

        Large fp32 tensors get blocks of their own and are lerped straight from the parameter (no
        copy); everything else is gathered into the scratch, small tensors packed together. A packed
        block spans the alignment gaps between its tensors; the scratch there holds stale but finite
        values and the shadow gaps it updates are never read.
        """
        scratch = torch.zeros(min(self.block, b.numel), dtype=torch.float32, device=b.rows[0].device)
        plan = []
        cur: list[tuple[torch.Tensor, int]] = []  # (piece, flat position) of the open packed block

        def flush() -> None:
            if cur:
                a = cur[0][1]
                e = cur[-1][1] + cur[-1][0].numel()
                plan.append(([pc for pc, _ in cur], [scratch[pos - a:pos - a + pc.numel()] for pc, pos in cur],
                             None, scratch[:e - a], [row[a:e] for row in b.rows]))
                cur.clear()

        for p, off in zip(b.live, b.offsets):
            n = p.numel()
            flat_p = torch.as_strided(p.detach(), (n,), (1,), p.storage_offset())  # storage order
            if p.dtype == torch.float32 and n >= self.block // 4:
                for i in range(0, n, self.block):
                    j = min(n, i + self.block)
                    plan.append(([], [], flat_p[i:j], None, [row[off + i:off + j] for row in b.rows]))
                continue
            i = 0
            while i < n:
                pos = off + i
                if cur and pos - cur[0][1] >= self.block:
                    flush()
                a = cur[0][1] if cur else pos
                take = min(n - i, self.block - (pos - a))
                cur.append((flat_p[i:i + take], pos))
                i += take
        flush()
        b.plan = plan
        b.ptrs = b.live_ptrs()

    @torch.no_grad()
    def step(self, decays: list[float]) -> None:
        weights = [1.0 - float(d) for d in decays]
        if len(weights) != self.num_rates:
            raise ValueError(f"expected {self.num_rates} decays, got {len(weights)}")
        for b in self.buckets:
            self._current(b)
            for pieces, dests, direct, src, rows in b.plan:
                if direct is None:
                    torch._foreach_copy_(dests, pieces)
                else:
                    src = direct
                for row, w in zip(rows, weights):
                    row.lerp_(src, w)
        self._step_loose(weights)
