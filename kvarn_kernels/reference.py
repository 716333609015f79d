"""The oracle: the plain-PyTorch definition of every KVarN operation, which the Triton kernels must match, and the
helpers that judge them (synthetic K/V, the precision floors of 16-bit attention). Readable and slow.

Imported by tests, `ops`' self-check and benchmarks only: front-ends call `ops`, `codec` and `dense` (the CPU
backend), and kernels take their constants from `constants`, `format` and `hadamard`. The definitions live there
(the CPU backend runs the same math): the quantizer is `codec` (normalize, round, pack, the K-frame rule, records),
attention is `dense.paged_attention` (each sequence's history dequantized, then exact float32 attention).
"""

from __future__ import annotations

import torch

from .codec import (  # noqa: F401  (the oracle's names for tests and benchmarks)
    _balanced,
    _imbalance,
    _std,
    check_k_weights,
    choose_k_rotation,
    dequantize_records,
    dequantize_tiles,
    k_frame_costs,
    k_range_cost,
    normalize_scales,
    pack,
    predicted_rtn_error,
    quantize_matrices,
    quantize_tile_records,
    sink_query_weights,
    unpack,
)
from .constants import (  # noqa: F401
    GUARD_FACTOR,
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    NORMALIZE_ITERS,
    RTN_MIN_SCALE,
    STD_MAX,
    STD_MIN,
)
from .dense import attend, gather_history
from .dense import paged_attention as paged_attention_ref  # noqa: F401
from .dense import quantize_into_cache as quantize_into_cache_ref  # noqa: F401
from .hadamard import hadamard, rotate  # noqa: F401
from .state import PagedKV


def synthetic_kv(
    length: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float16,
    outlier_channels: int = 4,
    outlier_scale: float = 20.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [length, num_heads, head_dim].

    Keys get a few channels with large offsets and spread (as in real RoPE'd keys) plus mild per-token
    scale variation; values are per-token scaled Gaussians with occasional spikes.
    """
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(length, num_heads, head_dim, generator=g)
    chans = torch.randperm(head_dim, generator=g)[:outlier_channels]
    k[:, :, chans] = k[:, :, chans] * outlier_scale / 4 + outlier_scale
    k = k * (1 + 0.5 * torch.rand(length, num_heads, 1, generator=g))
    v = torch.randn(length, num_heads, head_dim, generator=g) * (0.5 + torch.rand(length, num_heads, 1, generator=g))
    spikes = torch.rand(length, num_heads, head_dim, generator=g) < 0.002
    v = torch.where(spikes, v * 10, v)
    return k.to(dtype=dtype, device=device), v.to(dtype=dtype, device=device)


def sixteen_bit_decode(q: torch.Tensor, state: PagedKV) -> torch.Tensor:
    """Decode attention (one query per sequence, q [B, Hq, D]) as a FlashAttention-style kernel computes it from
    the dequantized history: keys and values rounded to q.dtype, probabilities rounded to q.dtype before P·V,
    float32 accumulation. Its distance from `paged_attention_ref` (all float32) is the precision floor of any kernel
    with 16-bit tensor-core operands, the yardstick for the Triton kernels' error on a GPU."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        k, v = gather_history(state, b)
        out[b] = attend(q[b][:, None, :], k, v, operand_dtype=q.dtype)[:, 0]
    return out


def sixteen_bit_chunk(
    q: torch.Tensor, state: PagedKV, cu_seqlens_q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> torch.Tensor:
    """`sixteen_bit_decode` for chunks: queries q [Tq, Hq, D] over each sequence's dequantized history plus its new
    tokens, bottom-right causal (the semantics of `paged_attention_ref`), with keys, values and probabilities rounded
    to q.dtype and float32 sums: the precision floor of a 16-bit flash attention over the dequantized history (the
    large-chunk route of `attention.paged_attention`)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if q1 == q0:
            continue
        k, v = gather_history(state, b)
        k = torch.cat([k, k_new[k0:k1].transpose(0, 1).float()], dim=1)
        v = torch.cat([v, v_new[k0:k1].transpose(0, 1).float()], dim=1)
        out[q0:q1] = attend(q[q0:q1].transpose(0, 1), k, v, operand_dtype=q.dtype).transpose(0, 1)
    return out


def exact_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unquantized attention of one query per head q [Hq, D] over 16-bit k, v [T, H, D] (GQA), float32 [Hq, D]."""
    return attend(q[:, None, :], k.transpose(0, 1), v.transpose(0, 1))[:, 0]
