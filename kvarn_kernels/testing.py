"""Synthetic K/V with the statistics that make KV quantization hard (outlier channels, token spikes)."""

from __future__ import annotations

import torch


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
