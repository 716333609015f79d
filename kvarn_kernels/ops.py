"""Device dispatch: Triton kernels on CUDA tensors, the PyTorch reference elsewhere (CPU).

Front-ends call these; tests and benchmarks call `attention`/`quantize` or `reference` directly to compare.
Set KVARN_FORCE_TRITON=1 to run the Triton kernels on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

from . import attention, quantize, reference
from .format import KVarNFormat
from .state import PagedKV


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("KVARN_FORCE_TRITON") == "1"


def quantize_into_cache(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    tile_starts: torch.Tensor,
    block_ids: torch.Tensor,
    cache: torch.Tensor,
    fmt: KVarNFormat,
) -> None:
    """Quantize G-token tiles of k_src/v_src [T, H, D] starting at tile_starts into cache[block_ids]."""
    fn = quantize.quantize_into_cache if _use_triton(cache) else reference.quantize_into_cache_ref
    fn(k_src, v_src, tile_starts, block_ids, cache, fmt)


def paged_attention(
    q: torch.Tensor,
    state: PagedKV,
    cu_seqlens_q: torch.Tensor,
    max_q_len: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    sm_scale: float | None = None,
    max_history: int | None = None,
) -> torch.Tensor:
    """Varlen attention over the paged state plus causal new tokens; see `reference.paged_attention_ref`.

    max_history: an upper bound (host int) on every sequence's cached length, or None (the block table's width).
    """
    if _use_triton(q):
        return attention.paged_attention(q, state, cu_seqlens_q, max_q_len, k_new, v_new, cu_seqlens_k, sm_scale,
                                         max_history=max_history)
    return reference.paged_attention_ref(q, state, cu_seqlens_q, k_new, v_new, cu_seqlens_k, sm_scale)
