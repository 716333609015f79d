"""Tile codecs: the one interface through which the quality reports, the simulated tile caches and the baselines
compare quantizers.

A `TileCodec` takes tiles k, v [N, H, G, D] (original frame) and returns their quantize-dequantize images, in the
input's dtype. Every codec here is built from the kernel core's plain-PyTorch quantizer (`kvarn_kernels.codec`), so
the simulated methods round exactly like the shipped format:
- `kvarn_codec`: the format itself (records written, then read back);
- `kivi_codec`: KIVI-style min-max round-to-nearest, keys per channel over the tile, values per token, no rotation,
  no normalization (`rtn` is the one implementation of that rounding);
- `kvarn_variant_codec`: KVarN with its parts switched on or off (rotation, normalization iterations, scale dtype),
  for ablations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvarn_kernels import KVarNFormat, scale_dtype_for
from kvarn_kernels.codec import choose_k_rotation, dequantize_tiles, quantize_matrices, quantize_tile_records
from kvarn_kernels.constants import NORMALIZE_ITERS, RTN_MIN_SCALE
from kvarn_kernels.hadamard import rotate as hadamard_rotate

TileCodec = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rtn(x: torch.Tensor, bits: int, dim: int = -1, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest of x along `dim` (round half up), returned dequantized in float32.

    scale_dtype: the dtype the minimum and the step are stored in (float32: unrounded; a 16-bit dtype rounds them
    as a 16-bit cache would)."""
    x = x.float()
    lo = x.amin(dim, keepdim=True).to(scale_dtype).float()
    step = ((x.amax(dim, keepdim=True) - lo) / (2**bits - 1)).clamp_min(RTN_MIN_SCALE).to(scale_dtype).float()
    return torch.floor((x - lo) / step + 0.5).clamp(0, 2**bits - 1) * step + lo


def kivi_codec(k_bits: int, v_bits: int, scale_dtype: torch.dtype | None = None) -> TileCodec:
    """KIVI-style min-max RTN: K per channel over the tile's tokens, V per token over channels.

    scale_dtype: the scales' dtype (None: the 16-bit dtype of the input's format, `scale_dtype_for`)."""

    def codec(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sdt = scale_dtype or scale_dtype_for(k.dtype)
        return rtn(k, k_bits, -2, sdt).to(k.dtype), rtn(v, v_bits, -1, sdt).to(v.dtype)

    return codec


def kvarn_codec(preset: str, activation_dtype: torch.dtype | None = None, rotate_k: bool | None = None) -> TileCodec:
    """KVarN records of `preset`: `quantize_tile_records` then `dequantize_tiles`.

    activation_dtype: the dtype whose format is used (its scale dtype; None: the input's dtype). rotate_k: None
    chooses K's frame per tile (format v2); True stores K always rotated (format v1)."""

    def codec(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = KVarNFormat.from_preset(preset, k.shape[-1], activation_dtype or k.dtype)
        k_hat, v_hat = dequantize_tiles(quantize_tile_records(k, v, fmt, rotate_k=rotate_k), fmt)
        return k_hat.to(k.dtype), v_hat.to(v.dtype)

    return codec


def kvarn_variant_codec(
    k_bits: int, v_bits: int, rotate: bool = True, iters: int = NORMALIZE_ITERS, scale_dtype: torch.dtype | None = None,
    rotate_k: bool | None = None,
) -> TileCodec:
    """KVarN with its parts switched on or off (for ablations), built from the kernel core's quantizer steps.

    rotate: Hadamard rotation of V, and of K where rotate_k says (None: where `choose_k_rotation` picks it, as format
    v2 does; True: always); rotate=False rotates nothing. iters: normalization iterations (0 = plain per-row RTN).
    scale_dtype: how the absorbed scales are stored (None: the format's choice for the input dtype; torch.float32:
    unrounded). With the defaults it reproduces `kvarn_codec`.
    """

    def matrix(x: torch.Tensor, bits: int, sdt: torch.dtype) -> torch.Tensor:
        codes, row_scale, row_zero, col_scale = quantize_matrices(x, bits, iters)
        row_scale, row_zero, col_scale = (t.to(sdt).float() for t in (row_scale, row_zero, col_scale))
        return (codes.float() * row_scale[..., None] + row_zero[..., None]) * col_scale[:, None, :]

    def codec(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, g, d = k.shape
        sdt = scale_dtype or scale_dtype_for(k.dtype)
        turn = hadamard_rotate if rotate else (lambda x: x.float())
        k_rot = turn(k)
        if not rotate:
            k_turn = torch.zeros((), dtype=torch.bool)
        elif rotate_k is None:
            k_turn = choose_k_rotation(k, k_rot)[..., None, None]
        else:
            k_turn = torch.tensor(bool(rotate_k))
        k_mat = torch.where(k_turn, k_rot, k.float()).reshape(n * h, g, d).transpose(1, 2)  # rows = channels
        v_mat = turn(v).reshape(n * h, g, d)  # rows = tokens
        k_hat = matrix(k_mat, k_bits, sdt).transpose(1, 2).reshape(n, h, g, d)
        k_hat = torch.where(k_turn, turn(k_hat), k_hat)
        v_hat = turn(matrix(v_mat, v_bits, sdt)).reshape(n, h, g, d)
        return k_hat.to(k.dtype), v_hat.to(v.dtype)

    return codec
