"""Triton kernels: attention of queries over packed KVarN tiles plus 16-bit sink, tail and new tokens.

One kernel serves decode (one query per sequence, split-K over tiles with a log-sum-exp merge) and chunks
(prefill continuation, prefix-cache hits, speculative verify: many queries per sequence, causal over new
16-bit tokens). Packed tiles are never dequantized to memory: scores come from the integer codes,

    q·k_t = col_scale[t] * (Σ_d (q_rot[d]·row_scale[d]) code[d, t] + Σ_d q_rot[d]·row_zero[d])

and the value side is folded the same way. Queries are rotated (q·H) once outside, and the rotated part of
the output is un-rotated once at the end. The oracle is `reference.paged_attention_ref`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .format import KVarNFormat
from .reference import hadamard
from .state import PagedKV

MIN_TILES_PER_SPLIT = 1
# Launch options of the attention kernel (benchmarks/kernels/bench_decode.py --tune sweeps them).
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 2}
CHUNK_LAUNCH_OPTIONS = {"num_warps": 8, "num_stages": 2}
# 16-bit tokens (sink, tail, new) are attended this many at a time: small blocks keep registers free.
DENSE_BLOCK = 32
CHUNK_ROWS = 64


@triton.jit
def _unpack_planes(words, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """Words [D, G/4] → codes [D, G] in the kernel's token order (see `_token_order`).

    join() adds an in-thread minor dimension and reshape() merges it, so no data moves between threads.
    """
    w = words.to(tl.int32)
    mask = 2**BITS - 1
    c01 = tl.join(w & mask, (w >> BITS) & mask)
    c23 = tl.join((w >> (2 * BITS)) & mask, (w >> (3 * BITS)) & mask)
    return tl.reshape(tl.join(c01, c23), [D, G])


@triton.jit
def _token_order(G: tl.constexpr):
    """Token held at each position of `_unpack_planes` output: position 4j + 2e + f is plane 2f + e of word j."""
    pos = tl.arange(0, G)
    q = pos % 4
    return (2 * (q % 2) + q // 2) * (G // 4) + pos // 4


@triton.jit
def _softmax_step(s, visible, m_i, l_i):
    """Online-softmax bookkeeping for scores s [ROWS, N]; returns (p, alpha, m_new, l_new)."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_dense(q, k_ptr, v_ptr, stride_tok, n_valid, key_pos0, q_pos, row_ok, m_i, l_i, acc,
                  sm_scale, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Attend to n_valid 16-bit tokens at k_ptr/v_ptr (token stride stride_tok), BLOCK_N at a time."""
    t = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    for start in range(0, n_valid, BLOCK_N):
        tok_ok = start + t < n_valid
        offs = (start + t)[:, None] * stride_tok + d[None, :]
        k = tl.load(k_ptr + offs, mask=tok_ok[:, None], other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        visible = row_ok[:, None] & tok_ok[None, :] & ((key_pos0 + start + t)[None, :] <= q_pos[:, None])
        p, alpha, m_i, l_i = _softmax_step(s, visible, m_i, l_i)
        v = tl.load(v_ptr + offs, mask=tok_ok[:, None], other=0.0).to(DOT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
    return m_i, l_i, acc


@triton.jit
def _attend_tile(q_rot, kw_ptr, vw_ptr, scales_ptr, key_pos0, q_pos, row_ok, m_i, l_i, acc,
                 sm_scale, G: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Attend to one packed tile straight from its codes; the output accumulates in the rotated frame.

    The tile is walked plane by plane (tokens a*G/4 .. (a+1)*G/4 - 1 of every word), one online-softmax
    update per plane, so only one plane's codes and scores are live at a time (register pressure is what
    limits this kernel). Re-reading a tile's words for each plane hits L1.
    """
    W: tl.constexpr = G // 4
    d = tl.arange(0, D)
    # Scores, scales and values all follow the unpacked codes' token order (a permutation of the tile).
    tok = _token_order(G)
    w_offs = d[:, None] * W + tl.arange(0, W)[None, :]
    qs = (q_rot * tl.load(scales_ptr + d).to(tl.float32)[None, :]).to(DOT)
    zero_term = tl.sum(q_rot * tl.load(scales_ptr + D + d).to(tl.float32)[None, :], axis=1)
    k_codes = _unpack_planes(tl.load(kw_ptr + w_offs), D, G, KBITS).to(DOT)  # [D, G]
    k_col_scale = tl.load(scales_ptr + 2 * D + tok).to(tl.float32)
    s = tl.dot(qs, k_codes, input_precision=PRECISION) + zero_term[:, None]
    s = s * (k_col_scale * sm_scale)[None, :]
    visible = row_ok[:, None] & ((key_pos0 + tok)[None, :] <= q_pos[:, None])
    p, alpha, m_i, l_i = _softmax_step(s, visible, m_i, l_i)
    v_codes = _unpack_planes(tl.load(vw_ptr + w_offs), D, G, VBITS).to(DOT)  # [D, G]
    v_row_scale = tl.load(scales_ptr + 2 * D + G + tok).to(tl.float32)
    v_row_zero = tl.load(scales_ptr + 2 * D + 2 * G + tok).to(tl.float32)
    pv = tl.dot((p * v_row_scale[None, :]).to(DOT), tl.trans(v_codes), input_precision=PRECISION)
    pv = pv + tl.sum(p * v_row_zero[None, :], axis=1)[:, None]
    v_col_scale = tl.load(scales_ptr + 2 * D + 3 * G + d).to(tl.float32)
    acc = acc * alpha[:, None] + pv * v_col_scale[None, :]
    return m_i, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q, q_rot, stride_qt, stride_qh,
    k_new, v_new, stride_nt, stride_nh,
    cu_q, cu_k, seq_lens, block_table, stride_bt, dense_table,
    k_words, v_words, scales, kw_sb, kw_sh, vw_sb, vw_sh, scales_sb, scales_sh,
    sink_k, sink_v, tail_k, tail_v, stride_db, stride_dh,
    part_plain, part_rot, part_m, part_l, stride_ps, stride_pt, stride_ph,
    sm_scale, tiles_per_split,
    N_REP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, HAS_NEW: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, DENSE_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    m_block = tl.program_id(1)
    kvh = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    hist = tl.load(seq_lens + b)
    if HAS_NEW:
        k_start = tl.load(cu_k + b)
        n_new = tl.load(cu_k + b + 1) - k_start
    else:
        k_start = 0
        n_new = 0

    r = tl.arange(0, ROWS)
    m_idx = m_block * BLOCK_M + r // N_REP
    head = kvh * N_REP + r % N_REP
    row_ok = (r // N_REP < BLOCK_M) & (m_idx < q_len)
    q_pos = hist + n_new - q_len + m_idx  # bottom-right causal over [history, new tokens]
    d = tl.arange(0, D)
    q_offs = (q_start + m_idx).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]

    # Two online-softmax states, merged at the end: quantized tiles (rotated frame) and 16-bit tokens.
    m_q = tl.full([ROWS], float("-inf"), tl.float32)
    l_q = tl.zeros([ROWS], tl.float32)
    acc_rot = tl.zeros([ROWS, D], tl.float32)
    m_d = tl.full([ROWS], float("-inf"), tl.float32)
    l_d = tl.zeros([ROWS], tl.float32)
    acc_plain = tl.zeros([ROWS, D], tl.float32)

    rest = tl.maximum(hist - G, 0)
    n_tiles = rest // G
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, n_tiles)
    if first_tile < last_tile:
        qr = tl.load(q_rot + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        for i in range(first_tile, last_tile):
            block = tl.load(block_table + b.to(tl.int64) * stride_bt + i).to(tl.int64)
            m_q, l_q, acc_rot = _attend_tile(
                qr, k_words + block * kw_sb + kvh * kw_sh, v_words + block * vw_sb + kvh * vw_sh,
                scales + block * scales_sb + kvh * scales_sh, G * (1 + i), q_pos, row_ok, m_q, l_q, acc_rot,
                sm_scale, G, D, KBITS, VBITS, DOT, PRECISION)

    qp = tl.load(q + q_offs, mask=row_ok[:, None], other=0.0).to(DOT)
    if split == 0:
        sink_block = tl.load(dense_table + 2 * b).to(tl.int64)
        base = sink_block * stride_db + kvh * stride_dh
        m_d, l_d, acc_plain = _attend_dense(qp, sink_k + base, sink_v + base, D, tl.minimum(hist, G), 0,
                                            q_pos, row_ok, m_d, l_d, acc_plain, sm_scale, DENSE_BLOCK, D, DOT,
                                            PRECISION)
    if split == NUM_SPLITS - 1:
        tail_block = tl.load(dense_table + 2 * b + 1).to(tl.int64)
        base = tail_block * stride_db + kvh * stride_dh
        tail_pos = G * (1 + n_tiles)
        m_d, l_d, acc_plain = _attend_dense(qp, tail_k + base, tail_v + base, D, hist - tail_pos, tail_pos,
                                            q_pos, row_ok, m_d, l_d, acc_plain, sm_scale, DENSE_BLOCK, D, DOT,
                                            PRECISION)
        if HAS_NEW:
            # Causal: this block's last query sees new tokens up to its own position.
            last_q = tl.minimum(m_block * BLOCK_M + BLOCK_M, q_len) - 1
            new_end = tl.minimum(n_new, last_q + n_new - q_len + 1)
            new_base = k_start.to(tl.int64) * stride_nt + kvh * stride_nh
            m_d, l_d, acc_plain = _attend_dense(qp, k_new + new_base, v_new + new_base, stride_nt, new_end, hist,
                                                q_pos, row_ok, m_d, l_d, acc_plain, sm_scale, DENSE_BLOCK, D, DOT,
                                                PRECISION)

    m_i = tl.maximum(m_q, m_d)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    w_q = tl.exp(m_q - m_safe)
    w_d = tl.exp(m_d - m_safe)
    l_i = l_q * w_q + l_d * w_d
    acc_rot = acc_rot * w_q[:, None]
    acc_plain = acc_plain * w_d[:, None]
    t_idx = (q_start + m_idx).to(tl.int64)
    out_offs = split * stride_ps + t_idx[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
    if NUM_SPLITS == 1:
        inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
        acc_plain = acc_plain * inv_l[:, None]
        acc_rot = acc_rot * inv_l[:, None]
    else:
        ml_offs = split * (stride_ps // D) + t_idx * (stride_pt // D) + head * (stride_ph // D)
        tl.store(part_m + ml_offs, m_i, mask=row_ok)
        tl.store(part_l + ml_offs, l_i, mask=row_ok)
    tl.store(part_plain + out_offs, acc_plain, mask=row_ok[:, None])
    tl.store(part_rot + out_offs, acc_rot, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(part_plain, part_rot, part_m, part_l, out_plain, out_rot, n_rows,
                         NUM_SPLITS: tl.constexpr, D: tl.constexpr):
    """Log-sum-exp merge of split partials [S, rows, D] into normalized outputs [rows, D]."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D)
    m = tl.load(part_m + s * n_rows + row)
    l_s = tl.load(part_l + s * n_rows + row)
    m_max = tl.max(m, axis=0)
    w = tl.where(l_s > 0, tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max)), 0.0)
    l_tot = tl.sum(w * l_s, axis=0)
    inv = tl.where(l_tot > 0, 1.0 / l_tot, 0.0)
    offs = (s * n_rows + row)[:, None] * D + d[None, :]
    plain = tl.sum(tl.load(part_plain + offs) * w[:, None], axis=0) * inv
    rot = tl.sum(tl.load(part_rot + offs) * w[:, None], axis=0) * inv
    tl.store(out_plain + row * D + d, plain)
    tl.store(out_rot + row * D + d, rot)


def choose_num_splits(batch: int, num_kv_heads: int, max_tiles: int, num_sms: int = 132) -> int:
    """A power of two: enough programs to fill the GPU twice over, none with fewer than MIN_TILES_PER_SPLIT tiles
    (a program walks its tiles one after another, so short contexts want one tile per program)."""
    by_work = triton.next_power_of_2(max(1, max_tiles // MIN_TILES_PER_SPLIT))
    by_occupancy = 1 << (max(1, math.ceil(2 * num_sms / (batch * num_kv_heads))).bit_length() - 1)
    return min(by_work, by_occupancy, 64)


def paged_attention(
    q: torch.Tensor,
    state: PagedKV,
    cu_seqlens_q: torch.Tensor,
    max_q_len: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Varlen attention over the paged KVarN state (see `reference.paged_attention_ref` for semantics).

    q [Tq, Hq, D]; k_new/v_new [Tk, H, D] with cu_seqlens_k; max_q_len bounds every sequence's query count
    (a host value, so nothing here synchronizes with the device). Returns [Tq, Hq, D] in q.dtype.
    """
    fmt = state.fmt
    _check_attention_inputs(q, state, cu_seqlens_q, k_new, v_new, cu_seqlens_k)
    tq, hq, d = q.shape
    hkv = state.num_kv_heads
    n_rep = hq // hkv
    batch = cu_seqlens_q.numel() - 1
    scale = sm_scale if sm_scale is not None else d**-0.5
    rot = hadamard(d, device=q.device)
    q_rot = (q.float().reshape(-1, d) @ rot).reshape(tq, hq, d)
    max_tiles = state.block_table.shape[1]
    splits = num_splits or choose_num_splits(batch, hkv, max_tiles, _num_sms(q.device))
    tiles_per_split = max(1, math.ceil(max_tiles / splits))

    # Decode: one query, its GQA group padded to the 16 rows of a tensor-core dot. Chunks: 64 rows of
    # (query, head) pairs, so each program re-reads the quantized history for 64 rows, not 16.
    block_m = max(1, min(CHUNK_ROWS // n_rep, triton.next_power_of_2(max_q_len)))
    rows = max(16, triton.next_power_of_2(block_m * n_rep))
    part_plain = torch.empty(splits, tq, hq, d, device=q.device, dtype=torch.float32)
    part_rot = torch.empty_like(part_plain)
    part_m = torch.empty(splits, tq, hq, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    has_new = k_new is not None
    kn = k_new if has_new else q
    vn = v_new if has_new else q
    k_words, v_words, scales = fmt.word_views(state.cache)
    dot = _dot_dtype(q.dtype)
    grid = (batch, triton.cdiv(max_q_len, block_m), hkv * splits)
    _paged_attention_kernel[grid](
        q, q_rot, q.stride(0), q.stride(1),
        kn, vn, kn.stride(0), kn.stride(1),
        cu_seqlens_q, cu_seqlens_k if has_new else cu_seqlens_q, state.seq_lens,
        state.block_table, state.block_table.stride(0), state.dense_table,
        k_words, v_words, scales, k_words.stride(0), k_words.stride(1), v_words.stride(0), v_words.stride(1),
        scales.stride(0), scales.stride(1),
        state.sink_k, state.sink_v, state.tail_k, state.tail_v, state.sink_k.stride(0), state.sink_k.stride(1),
        part_plain, part_rot, part_m, part_l, part_plain.stride(0), part_plain.stride(1), part_plain.stride(2),
        scale, tiles_per_split,
        N_REP=n_rep, G=fmt.group, D=d, KBITS=fmt.k_bits, VBITS=fmt.v_bits,
        BLOCK_M=block_m, ROWS=rows, HAS_NEW=has_new, NUM_SPLITS=splits,
        DOT=dot, PRECISION="ieee" if dot == tl.float32 else "tf32", DENSE_BLOCK=DENSE_BLOCK,
        **(LAUNCH_OPTIONS if rows <= 16 else CHUNK_LAUNCH_OPTIONS),
    )
    if splits == 1:
        out_plain, out_rot = part_plain[0], part_rot[0]
    else:
        out_plain = torch.empty(tq, hq, d, device=q.device, dtype=torch.float32)
        out_rot = torch.empty_like(out_plain)
        _merge_splits_kernel[(tq * hq,)](part_plain, part_rot, part_m, part_l, out_plain, out_rot, tq * hq,
                                         NUM_SPLITS=splits, D=d)
    out = torch.addmm(out_plain.reshape(-1, d), out_rot.reshape(-1, d), rot)
    return out.reshape(tq, hq, d).to(q.dtype)


def decode_attention(
    q: torch.Tensor, state: PagedKV, sm_scale: float | None = None, num_splits: int | None = None
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over the whole cached history (the new token is in the tail)."""
    cu = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_attention(q, state, cu, 1, sm_scale=sm_scale, num_splits=num_splits)


def chunk_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q_len: int,
    state: PagedKV,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """A chunk of new queries per sequence over its quantized history plus its causal 16-bit new tokens."""
    return paged_attention(q, state, cu_seqlens_q, max_q_len, k_new, v_new, cu_seqlens_k, sm_scale, num_splits)


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Tensor-core operand dtype: the model's 16-bit dtype (codes are exact in it); float32 for float32
    models and under the interpreter, whose bfloat16 dots are wrong."""
    if dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check_attention_inputs(q, state, cu_seqlens_q, k_new, v_new, cu_seqlens_k) -> None:
    state.validate()
    fmt: KVarNFormat = state.fmt
    if q.dim() != 3 or q.shape[-1] != fmt.head_dim:
        raise ValueError(f"q must be [T, Hq, {fmt.head_dim}], got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.stride(-1) != 1:
        raise ValueError(f"q must be float16/bfloat16/float32 with unit stride in head_dim, got {q.dtype}")
    hkv = state.num_kv_heads
    if q.shape[1] % hkv:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {hkv} KV heads")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.numel() != state.batch_size + 1:
        raise ValueError(
            f"cu_seqlens_q must be int32 [{state.batch_size + 1}], got {cu_seqlens_q.dtype} "
            f"{tuple(cu_seqlens_q.shape)}"
        )
    if (k_new is None) != (v_new is None) or (k_new is None) != (cu_seqlens_k is None):
        raise ValueError("k_new, v_new and cu_seqlens_k go together: pass all three or none")
    if k_new is not None:
        expected = (hkv, fmt.head_dim)
        if k_new.shape != v_new.shape or k_new.dim() != 3 or tuple(k_new.shape[1:]) != expected:
            raise ValueError(f"k_new/v_new must be [Tk, {hkv}, {fmt.head_dim}], got {tuple(k_new.shape)}")
        if k_new.stride() != v_new.stride() or k_new.stride(-1) != 1:
            raise ValueError("k_new and v_new need identical strides and unit stride in head_dim")
        if cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError("cu_seqlens_k must be int32 with the shape of cu_seqlens_q")
