"""Test helpers: synthetic K/V with the statistics that make KV quantization hard (outlier channels, token spikes),
and the precision floor of 16-bit attention against which GPU kernel errors are judged."""

from __future__ import annotations

import torch

from .reference import gather_history
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
    float32 accumulation. Its distance from `reference.paged_attention_ref` (all float32) is the precision floor of
    any kernel with 16-bit tensor-core operands, the yardstick for the Triton kernels' error on a GPU."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        k, v = gather_history(state, b)
        rep = q.shape[1] // k.shape[0]
        k = k.to(q.dtype).float().repeat_interleave(rep, 0)
        v = v.to(q.dtype).float().repeat_interleave(rep, 0)
        p = torch.softmax((q[b].float()[:, None, :] @ k.transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1)
        out[b] = (p.to(q.dtype).float() @ v)[:, 0]
    return out


def sixteen_bit_chunk(
    q: torch.Tensor, state: PagedKV, cu_seqlens_q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> torch.Tensor:
    """`sixteen_bit_decode` for chunks: queries q [Tq, Hq, D] over each sequence's dequantized history plus its new
    tokens, bottom-right causal (the semantics of `reference.paged_attention_ref`), with keys, values and
    probabilities rounded to q.dtype and float32 sums: the precision floor of a 16-bit flash attention over the
    dequantized history (the large-chunk route of `attention.paged_attention`)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if q1 == q0:
            continue
        k, v = gather_history(state, b)
        n_hist = k.shape[1]
        k = torch.cat([k.to(q.dtype), k_new[k0:k1].transpose(0, 1)], dim=1).float()
        v = torch.cat([v.to(q.dtype), v_new[k0:k1].transpose(0, 1)], dim=1).float()
        rep = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = (q[q0:q1].transpose(0, 1).float() @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
        q_pos = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)
        k_pos = torch.arange(k.shape[1], device=q.device)[None, :] - n_hist
        p = torch.softmax(s.masked_fill(k_pos > q_pos, float("-inf")), dim=-1)
        out[q0:q1] = (p.to(q.dtype).float() @ v).transpose(0, 1)
    return out
