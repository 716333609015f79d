"""Baselines KVarN is compared against: KIVI-style RTN (no rotation, no normalization) at the same bits."""

from __future__ import annotations

from collections.abc import Callable

import torch

# A quantize-dequantize round trip of tiles k, v [N, H, G, D] (original frame) → float32 reconstructions: the one
# interface the quality reports compare methods through.
TileCodec = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rtn_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest of each row of x [..., C], returned dequantized (float32)."""
    x = x.float()
    lo = x.amin(-1, keepdim=True)
    step = ((x.amax(-1, keepdim=True) - lo) / (2**bits - 1)).clamp_min(1e-10)
    return torch.floor((x - lo) / step + 0.5).clamp(0, 2**bits - 1) * step + lo


def kivi_tiles(k: torch.Tensor, v: torch.Tensor, k_bits: int, v_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI-style round trip of tiles k, v [N, H, G, D]: keys per channel over the tile, values per token."""
    k_hat = rtn_rows(k.transpose(-1, -2), k_bits).transpose(-1, -2)
    return k_hat, rtn_rows(v, v_bits)
