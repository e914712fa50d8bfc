"""Custom kernels for the hot loop: Triton flash attention as diffusers processors, fused multi-rate EMA.

Each kernel has a pure-torch reference next to it and a test comparing them on the CPU through
the Triton interpreter. `apply_attention_backend` is the entry point the runner uses.
"""

from .dispatch import apply_attention_backend, resolve_backend

__all__ = ["apply_attention_backend", "resolve_backend"]
