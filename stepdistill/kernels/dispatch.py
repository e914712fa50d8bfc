"""Choose the attention backend (config `kernels.attention`) and install it as diffusers processors.

auto: PyTorch SDPA, except on the shapes where a recorded GPU measurement showed the Triton kernel
faster (TRITON_MEASURED_FASTER, filled from benchmarks/RESULTS.md; empty until a GPU run records
one, so today auto is SDPA everywhere). `triton` and `xformers` stay selectable explicitly. Whatever
is chosen, each call still checks its inputs and hands shapes or dtypes the kernel does not cover
(CPU tensors, fp32 on CUDA, head dim > 256, a mask that wants a gradient) to SDPA, so a model with
mixed attention shapes always runs. The processors keep diffusers' semantics exactly; only the
attention call differs (see stepdistill.kernels.attention).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..errors import StepdistillError
from .attention import (MAX_HEAD_DIM, FlashAttnProcessor, FlashJointAttnProcessor, flash_attention, interpreting,
                        mask_to_bias, sdpa_attend, triton_problem)

BACKENDS = ("auto", "triton", "xformers", "sdpa")

# (CUDA compute capability, dtype, head dim) where bench_attention.py measured the Triton kernel faster
# than SDPA's best backend, forward and backward, at the shapes diffusers passes. Add an entry only with
# the measurement recorded in benchmarks/RESULTS.md (hardware named). None yet: no GPU has run it.
TRITON_MEASURED_FASTER: frozenset[tuple[tuple[int, int], torch.dtype, int]] = frozenset()


def triton_runnable() -> bool:
    """Triton kernels can run here: a CUDA device, or the CPU interpreter (tests)."""
    return triton_problem() is None and (torch.cuda.is_available() or interpreting())


def measured_faster(q: torch.Tensor) -> bool:
    """Whether a recorded GPU measurement says the Triton kernel beats SDPA for q's device, dtype and head dim."""
    if not q.is_cuda or not TRITON_MEASURED_FASTER:
        return False
    return (torch.cuda.get_device_capability(q.device), q.dtype, q.shape[-1]) in TRITON_MEASURED_FASTER


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """Whether flash_attention covers these inputs (else the caller uses SDPA)."""
    if triton_problem() or q.dim() != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        return False
    if q.shape[:2] != k.shape[:2] or q.shape[-1] > MAX_HEAD_DIM or not (q.dtype == k.dtype == v.dtype):
        return False
    if mask is not None and (mask.requires_grad or not (mask.dtype == torch.bool or mask.is_floating_point())):
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16)
    return q.device.type == "cpu" and interpreting() and q.dtype == torch.float32


def attend_triton(q, k, v, mask=None):
    if triton_supports(q, k, v, mask):
        return flash_attention(q, k, v, mask)
    return sdpa_attend(q, k, v, mask)


def attend_auto(q, k, v, mask=None):
    """SDPA unless a measurement recorded the Triton kernel faster on this shape (see TRITON_MEASURED_FASTER)."""
    if measured_faster(q) and triton_supports(q, k, v, mask):
        return flash_attention(q, k, v, mask)
    return sdpa_attend(q, k, v, mask)


def attend_xformers(q, k, v, mask=None):
    """xformers' memory-efficient attention with SDPA's layout and mask meaning (CUDA only)."""
    if not q.is_cuda:
        return sdpa_attend(q, k, v, mask)
    import xformers.ops as xops

    bias = mask_to_bias(mask, q.dtype)
    if bias is not None:
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        # xformers wants a materialised bias whose rows start on 8-element boundaries.
        dense = bias.new_empty(b, h, lq, lk + (-lk) % 8)[..., :lk]
        dense.copy_(bias.to(q.dtype).expand(b, h, lq, lk))
        bias = dense
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)


_ATTEND = {"auto": attend_auto, "triton": attend_triton, "xformers": attend_xformers, "sdpa": sdpa_attend}


def resolve_backend(backend: str) -> str:
    """The backend `backend` means on this machine; a StepdistillError for an impossible request."""
    if backend not in BACKENDS:
        raise StepdistillError(f"kernels.attention = {backend!r} is not allowed; choose one of {list(BACKENDS)}")
    if backend == "triton" and not triton_runnable():
        why = triton_problem() or "no CUDA device is visible"
        raise StepdistillError(f"kernels.attention = 'triton' cannot run here: {why}. "
                               "Set kernels.attention=auto (or sdpa) to use PyTorch's attention.")
    if backend == "xformers" and not xformers_available():
        raise StepdistillError("kernels.attention = 'xformers' but xformers is not installed. "
                               "Install it (pip install 'stepdistill[xformers]') or set kernels.attention=auto.")
    if backend != "auto":
        return backend
    if TRITON_MEASURED_FASTER and torch.cuda.is_available() and triton_runnable():
        capability = torch.cuda.get_device_capability()
        if any(entry[0] == capability for entry in TRITON_MEASURED_FASTER):
            return "auto"  # per-shape: Triton where measured faster, SDPA elsewhere
    return "sdpa"


def attention(q, k, v, mask=None, backend: str = "auto") -> torch.Tensor:
    """Functional entry: SDPA's layout and semantics through the chosen backend."""
    return _ATTEND[resolve_backend(backend)](q, k, v, mask)


def _processor_for(processor, backend: str):
    """The replacement for a supported diffusers processor, or None to leave it alone."""
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    if type(processor) in (AttnProcessor2_0, FlashAttnProcessor):
        return AttnProcessor2_0() if backend == "sdpa" else FlashAttnProcessor(_ATTEND[backend], backend)
    if type(processor) in (JointAttnProcessor2_0, FlashJointAttnProcessor):
        return JointAttnProcessor2_0() if backend == "sdpa" else FlashJointAttnProcessor(_ATTEND[backend], backend)
    return None


def apply_attention_backend(model: nn.Module, backend: str) -> str:
    """Set the backend's processor on every supported Attention module of `model`; return the backend used.

    Supported: modules whose processor is diffusers' AttnProcessor2_0 (UNet2DConditionModel,
    UNet2DModel, Transformer2DModel/DiT, SD3's second attention) or JointAttnProcessor2_0 (SD3);
    others (added-KV, IP-adapter, fused projections) keep their own processor. 'sdpa' restores
    diffusers' defaults on the modules this function changed.
    """
    from diffusers.models.attention_processor import Attention

    used = resolve_backend(backend)
    for module in model.modules():
        if isinstance(module, Attention):
            replacement = _processor_for(module.processor, used)
            if replacement is not None:
                module.set_processor(replacement)
    return used
