"""Triton kernel: quantize full tiles (rotate + normalize + round + pack) straight into a paged cache.

All tiles of a step go in one launch, grid (tiles, kv_heads); no host synchronization. The oracle is
`reference.quantize_into_cache_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .format import KVarNFormat
from .reference import NORMALIZE_ITERS

# The reference's constants, as constexprs so that jitted code may read them.
STD_MIN = tl.constexpr(reference.STD_MIN)
STD_MAX = tl.constexpr(reference.STD_MAX)
LOG_SCALE_MIN = tl.constexpr(reference.LOG_SCALE_MIN)
LOG_SCALE_MAX = tl.constexpr(reference.LOG_SCALE_MAX)
RTN_MIN_SCALE = tl.constexpr(reference.RTN_MIN_SCALE)
GUARD_FACTOR = tl.constexpr(reference.GUARD_FACTOR)


@triton.jit
def hadamard_signs(D: tl.constexpr):
    """Unnormalized Sylvester Hadamard matrix [D, D] of ±1 (float32), built in registers (D ≤ 256)."""
    x = tl.arange(0, D)[:, None] & tl.arange(0, D)[None, :]
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return 1.0 - 2.0 * (x & 1).to(tl.float32)


@triton.jit
def _std(x, AXIS: tl.constexpr, N: tl.constexpr):
    mean = tl.sum(x, axis=AXIS) / N
    if AXIS == 0:
        dev = x - mean[None, :]
    else:
        dev = x - mean[:, None]
    var = tl.sum(dev * dev, axis=AXIS) / (N - 1)
    return tl.minimum(tl.maximum(tl.sqrt(var), STD_MIN), STD_MAX)


@triton.jit
def _balance(x, log_r, log_c):
    return x * tl.exp(-log_r)[:, None] * tl.exp(-log_c)[None, :]


@triton.jit
def _ratio(std):
    return tl.max(std, axis=0) / tl.min(std, axis=0)


@triton.jit
def _predicted_rtn_error(x, log_r, log_c):
    bal = _balance(x, log_r, log_c)
    spread = (tl.max(bal, axis=1) - tl.min(bal, axis=1)) * tl.exp(log_r)
    energy = tl.sum(x * x, axis=1) + 1e-30
    return tl.sum(spread * spread / energy, axis=0) * tl.sum(tl.exp(2 * log_c), axis=0)


@triton.jit
def _round_to(x, ty: tl.constexpr):
    """float32 → ty with round-to-nearest-even, also where a backend's bfloat16 cast truncates."""
    if ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _quantize_store(x, words_ptr, scales_ptr, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                    ITERS: tl.constexpr, CODES_TRANSPOSED: tl.constexpr):
    """Normalize and round matrix x [R, C] (float32); write planar code words and row/col scales."""
    log_r = tl.zeros([R], dtype=tl.float32)
    log_c = tl.zeros([C], dtype=tl.float32)
    best_r = log_r
    best_c = log_c
    # A state's column std serves twice: in its imbalance and in the next column update.
    cs = _std(x, 0, R)
    best = _ratio(cs) + _ratio(_std(x, 1, C))
    for _ in range(ITERS):
        log_c = tl.minimum(tl.maximum(log_c + tl.log(cs), LOG_SCALE_MIN), LOG_SCALE_MAX)
        log_r = log_r + tl.log(_std(_balance(x, log_r, log_c), 1, C))
        log_r = tl.minimum(tl.maximum(log_r, LOG_SCALE_MIN), LOG_SCALE_MAX)
        cur = _balance(x, log_r, log_c)
        cs = _std(cur, 0, R)
        imb = _ratio(cs) + _ratio(_std(cur, 1, C))
        better = imb <= best
        best_r = tl.where(better, log_r, best_r)
        best_c = tl.where(better, log_c, best_c)
        best = tl.where(better, imb, best)
    # Guard: fall back to the untouched tile when balancing predicts a larger RTN error (see reference).
    zero_r = tl.zeros([R], dtype=tl.float32)
    zero_c = tl.zeros([C], dtype=tl.float32)
    worse = _predicted_rtn_error(x, best_r, best_c) > GUARD_FACTOR * _predicted_rtn_error(x, zero_r, zero_c)
    best_r = tl.where(worse, zero_r, best_r)
    best_c = tl.where(worse, zero_c, best_c)

    bal = _balance(x, best_r, best_c)
    lo = tl.min(bal, axis=1)
    hi = tl.max(bal, axis=1)
    step = tl.maximum((hi - lo) / (2**BITS - 1), RTN_MIN_SCALE)
    q = tl.floor((bal - lo[:, None]) / step[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 2**BITS - 1).to(tl.int32)
    if CODES_TRANSPOSED:
        _store_words(tl.trans(q), words_ptr, C, R, BITS)
    else:
        _store_words(q, words_ptr, R, C, BITS)

    r = tl.arange(0, R)
    # NaN/Inf anywhere in the tile must show, as in the reference: max/min would silently drop NaNs.
    poison = tl.sum(tl.sum(x * 0.0, axis=1), axis=0)  # 0, or NaN when x holds a NaN or an Inf
    s_row = tl.exp(best_r) + poison
    ty: tl.constexpr = scales_ptr.dtype.element_ty
    tl.store(scales_ptr + r, _round_to(s_row * step, ty))
    tl.store(scales_ptr + R + r, _round_to(s_row * lo, ty))
    tl.store(scales_ptr + 2 * R + tl.arange(0, C), _round_to(tl.exp(best_c), ty))


@triton.jit
def _store_words(q, words_ptr, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """Pack codes q [ROWS, N] planar: word j of a row holds columns j, j+N/4, j+N/2, j+3N/4."""
    planes = tl.reshape(q, [ROWS, 4, N // 4])
    shifts = (tl.arange(0, 4) * BITS)[None, :, None]
    words = tl.sum(planes << shifts, axis=1)
    offs = tl.arange(0, ROWS)[:, None] * (N // 4) + tl.arange(0, N // 4)[None, :]
    tl.store(words_ptr + offs, words.to(words_ptr.dtype.element_ty))


@triton.jit
def _quantize_tiles_kernel(
    k_src, v_src, stride_t, stride_h,
    tile_starts, block_ids,
    k_words, v_words, scales, kw_stride_b, kw_stride_h, vw_stride_b, vw_stride_h, scales_stride_b, scales_stride_h,
    G: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, ITERS: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(tile_starts + n).to(tl.int64)
    block = tl.load(block_ids + n).to(tl.int64)
    src = (start + tl.arange(0, G))[:, None] * stride_t + h * stride_h + tl.arange(0, D // 2)[None, :]
    scales_base = scales + block * scales_stride_b + h * scales_stride_h
    # K and V of a tile are independent: separate programs double the parallelism of this latency-bound
    # kernel (its many tile-wide reductions each wait on a barrier).
    if tl.program_id(2) == 0:
        k_rot = _rotate(k_src + src, G, D)
        _quantize_store(tl.trans(k_rot), k_words + block * kw_stride_b + h * kw_stride_h, scales_base,
                        D, G, KBITS, ITERS, False)
    else:
        v_rot = _rotate(v_src + src, G, D)
        _quantize_store(v_rot, v_words + block * vw_stride_b + h * vw_stride_h, scales_base + 2 * D + G,
                        G, D, VBITS, ITERS, True)


@triton.jit
def _rotate(ptrs, G: tl.constexpr, D: tl.constexpr):
    """x · H for the tile at ptrs (its first D/2 columns; the rest follow): [G, D] float32.

    Uses H_D = [[S, S], [S, -S]] / sqrt(D) with S the ±1 Hadamard of size D/2, which halves the
    on-chip matrix (D = 256 would not fit in shared memory otherwise). IEEE dots keep it exact enough
    to match the reference code for code.
    """
    xa = tl.load(ptrs).to(tl.float32)
    xb = tl.load(ptrs + D // 2).to(tl.float32)
    signs = hadamard_signs(D // 2)
    ra = tl.dot(xa + xb, signs, input_precision="ieee")
    rb = tl.dot(xa - xb, signs, input_precision="ieee")
    both = tl.permute(tl.join(ra, rb), (0, 2, 1))  # [G, 2, D/2]
    return tl.reshape(both, [G, D]) * (1.0 / tl.sqrt(D * 1.0))


def quantize_into_cache(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    tile_starts: torch.Tensor,
    block_ids: torch.Tensor,
    cache: torch.Tensor,
    fmt: KVarNFormat,
) -> None:
    """Quantize tiles of G tokens from k_src/v_src [T, H, D] into cache blocks, all in one launch.

    Tile i holds tokens tile_starts[i] .. tile_starts[i] + G - 1 of the source and is written to
    cache[block_ids[i]] (all KV heads). The caller guarantees the tokens exist (no host sync here).
    """
    _check_sources(k_src, v_src, tile_starts, block_ids, cache, fmt)
    n = tile_starts.numel()
    if n == 0:
        return
    k_words, v_words, scales = fmt.word_views(cache)
    # D=256 tiles hold 32K floats per matrix: spread them over more warps to avoid spills.
    num_warps = 8 if fmt.head_dim * fmt.group <= 128 * 128 else 16
    _quantize_tiles_kernel[(n, k_src.shape[1], 2)](
        k_src, v_src, k_src.stride(0), k_src.stride(1),
        tile_starts, block_ids,
        k_words, v_words, scales, k_words.stride(0), k_words.stride(1), v_words.stride(0), v_words.stride(1),
        scales.stride(0), scales.stride(1),
        G=fmt.group, D=fmt.head_dim, KBITS=fmt.k_bits, VBITS=fmt.v_bits, ITERS=NORMALIZE_ITERS,
        num_warps=num_warps,
    )


def _check_sources(k_src, v_src, tile_starts, block_ids, cache, fmt: KVarNFormat) -> None:
    if k_src.shape != v_src.shape or k_src.dim() != 3 or k_src.shape[-1] != fmt.head_dim:
        raise ValueError(
            f"k_src/v_src must both be [T, H, {fmt.head_dim}], got {tuple(k_src.shape)} and {tuple(v_src.shape)}"
        )
    if k_src.dtype != v_src.dtype or k_src.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"K/V dtype {k_src.dtype}/{v_src.dtype} is not supported: use float16, bfloat16 or float32")
    if k_src.stride(-1) != 1 or v_src.stride() != k_src.stride():
        raise ValueError("k_src and v_src need unit stride in head_dim and identical strides")
    if k_src.shape[1] != cache.shape[1]:
        raise ValueError(f"k_src has {k_src.shape[1]} KV heads but the cache has {cache.shape[1]}")
    for name, t in (("tile_starts", tile_starts), ("block_ids", block_ids)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if tile_starts.shape != block_ids.shape:
        raise ValueError(f"tile_starts {tuple(tile_starts.shape)} and block_ids {tuple(block_ids.shape)} differ")
    for t in (k_src, v_src, tile_starts, block_ids):
        if t.device != cache.device:
            raise ValueError(f"all inputs must be on the cache's device {cache.device}, found {t.device}")
