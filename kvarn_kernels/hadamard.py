"""The Hadamard rotation: the normalized matrix for plain PyTorch (Sylvester for powers of two; H12 ⊗ H_{D/12} for
D = 12·2^k, e.g. 96), its ±1 form for kernels (zero-padded to a power of two), and the in-kernel un-rotation the
attention and dense-history kernels share."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl


@triton.constexpr_function
def padded_dim(head_dim: int) -> int:
    """The power of two a kernel holds head_dim channels in (tl.arange needs one): head_dim itself, 128 for 96. The
    padding lives in registers only: loads and stores of the padded channels are masked, records hold head_dim."""
    return triton.next_power_of_2(head_dim)


@triton.jit
def load_channels(ptrs, ch, D: tl.constexpr):
    """tl.load(ptrs) where ch (channel indices, broadcast to ptrs' shape) runs over padded_dim(D): padded channels
    read 0 (masked). Power-of-two D: an unmasked load, as before padding."""
    if padded_dim(D) != D:
        x = tl.load(ptrs, mask=ch < D, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


def hadamard(dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A Hadamard matrix of size `dim` scaled by 1/sqrt(dim): symmetric and its own inverse. `dim` is a power of two
    (Sylvester) or 12 times one (H12 ⊗ Sylvester, H12 the symmetric Paley II matrix of q = 5).

    Cached per (dim, dtype, device): callers on the decode path must not rebuild it (or sync) every step.
    """
    base = dim // 12 if dim % 12 == 0 else dim
    if dim < 1 or base & (base - 1):
        raise ValueError(f"Hadamard size {dim} is not supported: use a power of two or 12 times one (e.g. 96)")
    return _hadamard(dim, dtype, str(torch.device(device)))


def _sylvester(dim: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley12() -> torch.Tensor:
    """The symmetric ±1 Hadamard matrix of order 12 (Paley construction II, q = 5): from the symmetric conference
    matrix C = [[0, 1ᵀ], [1, Q]] (Q[i, j] = χ(j − i), χ the quadratic character mod 5, symmetric as 5 ≡ 1 mod 4),
    H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]: every factor is symmetric, so H is."""
    q = 5
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if x in squares else -1.0 for x in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=32)
def _hadamard(dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.kron(paley12(), _sylvester(dim // 12)) if dim % 12 == 0 else _sylvester(dim)
    return (h / math.sqrt(dim)).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x · H along the last dimension, in float32 (H = Hᵀ = H⁻¹, so this also un-rotates)."""
    return x.float() @ hadamard(x.shape[-1], device=x.device)


def hadamard_signs(dim: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The unnormalized Hadamard matrix (±1, exact in every float dtype), contiguous [P, P] with P = padded_dim(dim):
    the dim x dim matrix in the top-left block, zeros elsewhere (so padded channels neither feed nor receive anything).
    Kernels take it as an operand and scale by 1/sqrt(dim). Cached per (dim, dtype, device): no rebuild and no sync
    per step."""
    return _hadamard_signs(dim, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _hadamard_signs(dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    p = padded_dim(dim)
    signs = torch.zeros(p, p, dtype=torch.float64)
    signs[:dim, :dim] = (hadamard(dim, torch.float64) * math.sqrt(dim)).round()
    return signs.to(dtype=dtype, device=device).contiguous()


@triton.jit
def unrotate(x, hadamard_ptr, D: tl.constexpr, F32: tl.constexpr):
    """x·H/sqrt(D) for float32 x [R, P] (P = padded_dim(D); H: ±1 entries at hadamard_ptr, [P, P] zero-padded, so
    padded channels come out 0). On a GPU with 16-bit dots x is split
    into two bfloat16 parts (hi + lo: 16 significant bits and float32's range, so nothing overflows) whose
    products with H are exact: more precise than one tf32 dot. F32 (float32 models, the interpreter): an IEEE
    float32 dot."""
    P: tl.constexpr = padded_dim(D)
    d = tl.arange(0, P)
    # H is symmetric: loading it through transposed offsets gives the same matrix but keeps the compiler from
    # merging this load with the prologue's (q·H), which kept H live in registers across the tile loop.
    h = tl.load(hadamard_ptr + d[None, :] * P + d[:, None])
    if F32:
        y = tl.dot(x, h.to(tl.float32), input_precision="ieee")
    else:
        hb = h.to(tl.bfloat16)
        hi = x.to(tl.bfloat16)
        y = tl.dot(hi, hb)
        y = tl.dot((x - hi.to(tl.float32)).to(tl.bfloat16), hb, y)
    return y * (1.0 / tl.sqrt(D * 1.0))
