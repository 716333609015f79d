"""Triton kernel: a sequence batch's history (sink + dequantized tiles + tail) and new tokens as dense 16-bit K/V.

Large chunks (prefill continuation over a long history, big prefix-cache hits) are compute-bound: every query
re-reads every tile, and the packed-tile kernel pays the code unpacking and the 16-row GQA padding for each query
block. For them `attention.paged_attention` dequantizes each tile once, with this kernel, into a transient packed
varlen buffer (sequence b's keys at rows cu_out[b] ..., history first, then its new tokens) and runs a varlen flash
attention over it. Decode never takes this route: it reads the packed tiles directly.

One launch, grid (batch, kv_heads, units): unit i < max_tiles dequantizes tile i of the sequence (K in its stored
frame, un-rotated with the exact bf16 hi+lo dots when its K-frame flag says rotated; V always un-rotated), the next
two copy the 16-bit sink and tail, the rest copy the new tokens G at a time. The oracle is
`reference.gather_history` plus the new tokens. head_dim 96 runs 128 wide (`padded_dim`): padded channels are masked
out of every load and store, and the zero-padded ±1 operand keeps them out of the un-rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .env import interpreted
from .format import k_frame_flag_offset, k_frame_is_rotated, scale_offset
from .hadamard import hadamard_signs, load_channels, padded_dim, unrotate
from .state import PagedKV

# Launch option (aot.py compiles with it too): 8 warps hold a [D, G] tile pass at 255 registers with a small spill.
NUM_WARPS = 8


@triton.jit
def _copy_rows(src, src_stride, dst, dst_stride, n, D: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, padded_dim(D))
    ok = (t < n)[:, None]
    if padded_dim(D) != D:
        ok = ok & (d < D)[None, :]
    x = tl.load(src + t[:, None] * src_stride + d[None, :], mask=ok, other=0.0)
    tl.store(dst + t[:, None] * dst_stride + d[None, :], x.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _codes(words_ptr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Codes [D, G] of a record's planar words (word j of a channel holds tokens j, j+W, j+2W, j+3W; W = G/4)."""
    W: tl.constexpr = G // 4
    d = tl.arange(0, padded_dim(D))
    t = tl.arange(0, G)
    if padded_dim(D) != D:
        w = tl.load(words_ptr + d[:, None] * W + (t % W)[None, :], mask=(d < D)[:, None], other=0).to(tl.int32)
    else:
        w = tl.load(words_ptr + d[:, None] * W + (t % W)[None, :]).to(tl.int32)
    return ((w >> ((t // W) * BITS)[None, :]) & (2**BITS - 1)).to(tl.float32)


@triton.jit
def _dense_history_kernel(
    k_out, v_out, stride_ot, stride_oh, cu_out,
    seq_lens, block_table, stride_bt, dense_table,
    k_words, v_words, scales, kw_sb, kw_sh, vw_sb, vw_sh, sc_sb, sc_sh,
    sink_k, sink_v, tail_k, tail_v, stride_db, stride_dh,
    k_new, v_new, stride_nt, stride_nh, cu_k, hadamard_ptr, max_tiles,
    G: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, HAS_NEW: tl.constexpr,
    UNROTATE_F32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    u = tl.program_id(2)
    hist = tl.load(seq_lens + b)
    n_tiles = tl.maximum(hist - G, 0) // G
    row0 = tl.load(cu_out + b).to(tl.int64)
    out_k = k_out + row0 * stride_ot + h * stride_oh
    out_v = v_out + row0 * stride_ot + h * stride_oh
    t = tl.arange(0, G)
    d = tl.arange(0, padded_dim(D))  # head_dim 96: 128 wide, padded channels masked
    if u < n_tiles:
        block = tl.load(block_table + b.to(tl.int64) * stride_bt + u).to(tl.int64)
        sc = scales + block * sc_sb + h * sc_sh
        # K [D, G]: (code · row_scale[d] + row_zero[d]) · |col_scale[t]|; col_scale[0]'s sign is the K-frame flag.
        kcs = tl.load(sc + scale_offset("k_col_scale", D, G) + t).to(tl.float32)
        k_mat = (_codes(k_words + block * kw_sb + h * kw_sh, KBITS, G, D)
                 * load_channels(sc + scale_offset("k_row_scale", D, G) + d, d, D).to(tl.float32)[:, None]
                 + load_channels(sc + scale_offset("k_row_zero", D, G) + d, d, D).to(tl.float32)[:, None]
                 ) * tl.abs(kcs)[None, :]
        rotated = k_frame_is_rotated(tl.load(sc + k_frame_flag_offset(D, G) + t * 0))  # broadcast over the tokens
        k_tok = tl.trans(k_mat)
        k_tok = tl.where(rotated[:, None], unrotate(k_tok, hadamard_ptr, D, UNROTATE_F32), k_tok)
        # V [D, G] in the rotated frame: (code · row_scale[t] + row_zero[t]) · col_scale[d], then un-rotated.
        v_mat = (_codes(v_words + block * vw_sb + h * vw_sh, VBITS, G, D)
                 * tl.load(sc + scale_offset("v_row_scale", D, G) + t).to(tl.float32)[None, :]
                 + tl.load(sc + scale_offset("v_row_zero", D, G) + t).to(tl.float32)[None, :]) * load_channels(
            sc + scale_offset("v_col_scale", D, G) + d, d, D).to(tl.float32)[:, None]
        v_tok = unrotate(tl.trans(v_mat), hadamard_ptr, D, UNROTATE_F32)
        offs = (G * (1 + u) + t).to(tl.int64)[:, None] * stride_ot + d[None, :]
        if padded_dim(D) != D:
            tl.store(out_k + offs, k_tok.to(k_out.dtype.element_ty), mask=(d < D)[None, :])
            tl.store(out_v + offs, v_tok.to(v_out.dtype.element_ty), mask=(d < D)[None, :])
        else:
            tl.store(out_k + offs, k_tok.to(k_out.dtype.element_ty))
            tl.store(out_v + offs, v_tok.to(v_out.dtype.element_ty))
    elif u == max_tiles:
        base = tl.load(dense_table + 2 * b).to(tl.int64) * stride_db + h * stride_dh
        n = tl.minimum(hist, G)
        _copy_rows(sink_k + base, D, out_k, stride_ot, n, D, G)
        _copy_rows(sink_v + base, D, out_v, stride_ot, n, D, G)
    elif u == max_tiles + 1:
        base = tl.load(dense_table + 2 * b + 1).to(tl.int64) * stride_db + h * stride_dh
        start = G * (1 + n_tiles)
        n = tl.maximum(hist - start, 0)
        _copy_rows(tail_k + base, D, out_k + start * stride_ot, stride_ot, n, D, G)
        _copy_rows(tail_v + base, D, out_v + start * stride_ot, stride_ot, n, D, G)
    elif HAS_NEW and u >= max_tiles + 2:  # (units n_tiles .. max_tiles - 1 of a shorter sequence do nothing)
        first = (u - max_tiles - 2) * G
        k0 = tl.load(cu_k + b)
        n = tl.load(cu_k + b + 1) - k0 - first
        src = (k0 + first).to(tl.int64) * stride_nt + h * stride_nh
        dst = (hist + first).to(tl.int64) * stride_ot
        _copy_rows(k_new + src, stride_nt, out_k + dst, stride_ot, n, D, G)
        _copy_rows(v_new + src, stride_nt, out_v + dst, stride_ot, n, D, G)


def buffer_rows(state: PagedKV, k_new: torch.Tensor | None = None, max_history: int | None = None) -> int:
    """Rows of `dense_history`'s K (and V) buffer: each sequence's history bound (sink + tiles + a tail below G)
    plus all new tokens."""
    return state.batch_size * state.fmt.group * (state.max_tiles(max_history) + 2) + (
        k_new.shape[0] if k_new is not None else 0)


def dense_history(
    state: PagedKV,
    dtype: torch.dtype,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_history: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every sequence's history, dequantized, followed by its new tokens, as packed varlen K/V [T, H, D] in `dtype`.

    Returns (k, v, cu_seqlens int32 [B + 1] of the keys per sequence, max keys per sequence: a host bound). No host
    synchronization: the buffers are sized by host bounds (max_history, or the block table's width, per sequence
    plus all new tokens) and the rows past cu_seqlens[-1] are left unwritten.
    """
    fmt = state.fmt
    batch, heads, g, d = state.batch_size, state.num_kv_heads, fmt.group, fmt.head_dim
    max_tiles = state.max_tiles(max_history)
    n_new_total = k_new.shape[0] if k_new is not None else 0
    lens = state.seq_lens
    if k_new is not None:
        lens = lens + (cu_seqlens_k[1:] - cu_seqlens_k[:-1])
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=lens.device)
    torch.cumsum(lens, 0, out=cu[1:])
    k = torch.empty(buffer_rows(state, k_new, max_history), heads, d, dtype=dtype, device=lens.device)
    v = torch.empty_like(k)
    k_words, v_words, scales = fmt.word_views(state.cache)
    has_new = k_new is not None
    kn = k_new if has_new else k
    vn = v_new if has_new else v
    new_units = triton.cdiv(n_new_total, g) if has_new else 0
    grid = (batch, heads, max_tiles + 2 + new_units)
    _dense_history_kernel[grid](
        k, v, k.stride(0), k.stride(1), cu,
        state.seq_lens, state.block_table, state.block_table.stride(0), state.dense_table,
        k_words, v_words, scales, k_words.stride(0), k_words.stride(1), v_words.stride(0), v_words.stride(1),
        scales.stride(0), scales.stride(1),
        state.sink_k, state.sink_v, state.tail_k, state.tail_v, state.sink_k.stride(0), state.sink_k.stride(1),
        kn, vn, kn.stride(0), kn.stride(1), cu_seqlens_k if has_new else cu,
        hadamard_signs(d, torch.bfloat16, k.device), max_tiles,
        G=g, D=d, KBITS=fmt.k_bits, VBITS=fmt.v_bits, HAS_NEW=has_new,
        UNROTATE_F32=interpreted() or not k.is_cuda or dtype == torch.float32, num_warps=NUM_WARPS,
    )
    return k, v, cu, g * (max_tiles + 2) + n_new_total  # sink + tiles + a tail below G, then new tokens
