"""The Hadamard rotation: the normalized Sylvester matrix for plain PyTorch, its ±1 form for kernels, and the
in-kernel un-rotation the attention and dense-history kernels share."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl


def hadamard(dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester Hadamard matrix of size `dim` scaled by 1/sqrt(dim): symmetric and its own inverse.

    Cached per (dim, dtype, device): callers on the decode path must not rebuild it (or sync) every step.
    """
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"Hadamard size {dim} is not a power of two")
    return _hadamard(dim, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _hadamard(dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(dim)).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x · H along the last dimension, in float32 (H = Hᵀ = H⁻¹, so this also un-rotates)."""
    return x.float() @ hadamard(x.shape[-1], device=x.device)



def hadamard_signs(dim: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The unnormalized Hadamard matrix (±1, exact in every float dtype), contiguous: kernels take it as an operand
    and scale by 1/sqrt(dim). Cached per (dim, dtype, device): no rebuild and no sync per step."""
    return _hadamard_signs(dim, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _hadamard_signs(dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (hadamard(dim, torch.float64) * math.sqrt(dim)).round().to(dtype=dtype, device=device).contiguous()


@triton.jit
def unrotate(x, hadamard_ptr, D: tl.constexpr, F32: tl.constexpr):
    """x·H/sqrt(D) for float32 x [R, D] (H: ±1 entries at hadamard_ptr). On a GPU with 16-bit dots x is split
    into two bfloat16 parts (hi + lo: 16 significant bits and float32's range, so nothing overflows) whose
    products with H are exact: more precise than one tf32 dot. F32 (float32 models, the interpreter): an IEEE
    float32 dot."""
    d = tl.arange(0, D)
    # H is symmetric: loading it through transposed offsets gives the same matrix but keeps the compiler from
    # merging this load with the prologue's (q·H), which kept H live in registers across the tile loop.
    h = tl.load(hadamard_ptr + d[None, :] * D + d[:, None])
    if F32:
        y = tl.dot(x, h.to(tl.float32), input_precision="ieee")
    else:
        hb = h.to(tl.bfloat16)
        hi = x.to(tl.bfloat16)
        y = tl.dot(hi, hb)
        y = tl.dot((x - hi.to(tl.float32)).to(tl.bfloat16), hb, y)
    return y * (1.0 / tl.sqrt(D * 1.0))
