"""Triton kernels: attention of queries over packed KVarN tiles plus 16-bit sink, tail and new tokens.

One kernel serves decode (one query per sequence, split-K over tiles with a log-sum-exp merge) and chunks
(prefill continuation, prefix-cache hits, speculative verify: many queries per sequence, causal over new
16-bit tokens). Packed tiles are never dequantized to memory: scores come from the integer codes,

    q·k_t = col_scale[t] * (Σ_d (q_rot[d]·row_scale[d]) code[d, t] + Σ_d q_rot[d]·row_zero[d])

(q_rot is q itself for a tile whose K-frame flag says K is stored unrotated; format v2) and the value side
is folded the same way (V is always rotated). Each bit plane of a tile (W = G/4 consecutive tokens) is one
tensor-core operand; on the GPU a code becomes a 16-bit float by OR-ing it into a constant's mantissa (no
int→float conversion). The attention kernel rotates its queries (q·H, a dot with the ±1 Hadamard matrix), attends,
un-rotates its quantized part (·H) and either stores the output in the query's dtype (one split) or writes a split
partial; with several splits a second launch merges them (log-sum-exp, one program per (query, head) row). The
oracle is `reference.paged_attention_ref`.

head_dim 96 runs 128 wide (`hadamard.padded_dim`: tl.arange needs a power of two): padded channels load as zeros
(queries, codes, scales, 16-bit tokens), the zero-padded ±1 operand keeps them zero through q·H and the un-rotation, and
they are never stored. Power-of-two head dims skip every mask (constexpr branches): their sm_90 builds have the
instructions they had before (a few ordered differently).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .dense_history import buffer_rows, dense_history
from .env import check_tables, interpreted
from .format import KVarNFormat, k_frame_flag_offset, k_frame_is_rotated, scale_offset
from .hadamard import hadamard_signs, load_channels, padded_dim, unrotate
from .state import PagedKV

MIN_TILES_PER_SPLIT = 1
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
@dataclass(frozen=True)
class Tuning:
    """The attention kernel's launch choices, in one documented table. Each was measured on an H100 (the A/B figures
    and rejected tries are in benchmarks/HISTORY.md under "Attention and quantize kernel constants"). Every call uses
    `TUNING` unless given another: benchmarks and tests pass a variant (`dataclasses.replace(TUNING, ...)`) to
    `paged_attention`/`decode_attention`/`chunk_attention` as `tuning=`, nothing patches module globals."""

    # Launch options of the attention kernel (benchmarks/kernels/bench_decode.py --tune sweeps them).
    launch_options: dict = field(default_factory=lambda: {"num_warps": 4, "num_stages": 2})
    # head_dim 256: 8 warps (with 4, the sm_90 build runs out of registers and spills).
    launch_options_d256: dict = field(default_factory=lambda: {"num_warps": 8, "num_stages": 2})
    # head_dim 64 (16-bit models): uncapped; a register cap made the row-group loop spill and run slower.
    launch_options_d64: dict = field(default_factory=lambda: {"num_warps": 4, "num_stages": 2})
    # head_dim 128 in row groups (4 tiles per iteration): 3 stages (faster at long contexts; one tile at a time keeps
    # 2).
    launch_options_groups: dict = field(default_factory=lambda: {"num_warps": 4, "num_stages": 3})
    # Chunks: 4 warps. With 8, Triton 3.6 miscompiles the head_dim-64, 64-row chunk program on sm_90 (an
    # out-of-range shared-memory access found by compute-sanitizer in the K-plane dot).
    chunk_launch_options: dict = field(default_factory=lambda: {"num_warps": 4, "num_stages": 2})
    # 16-bit tokens (sink, tail, new) are attended this many at a time: small blocks keep registers free.
    dense_block: int = 32
    # Work units a split counts for G 16-bit tokens (the sink; the tail with the new tokens, pro rata) against 1 per
    # packed tile: a 16-bit block loads 4.6x a tile's bytes. Decode only: chunks keep 1 (their build spilled more).
    dense_units: int = 3
    # (query, head) rows of a chunk program, by head_dim (others: chunk_rows_default): at head_dim 128, 64 rows
    # spilled heavily in the tile loop and 32 rows ran faster at every chunk size measured.
    chunk_rows: dict = field(default_factory=lambda: {128: 32, 96: 32})  # 96 runs 128 wide (not measured apart)
    chunk_rows_default: int = 64
    # Chunks of at least this many queries per sequence (on a GPU, 16-bit models) dequantize the history once into a
    # transient 16-bit buffer and run torch's varlen flash attention over it (`dense_history.py`): from there that is
    # faster than re-reading the packed tiles per query block. dense_chunks=False: never.
    dense_chunk_min_queries: int = 256
    dense_chunks: bool = True
    # ... as long as that buffer stays below this many bytes (K and V together); larger ones take the packed-tile path.
    dense_chunk_max_bytes: int = 4 << 30
    # Decode attends up to this many tiles at once, one per row group (`_attend_tile_group`); 1: one tile at a time ...
    max_tile_groups: int = 4
    # ... when each split has at least this many work units; below, one at a time (a short split is latency-bound, and
    # a group iteration takes longer than a one-tile one). tests/benchmarks/test_sweep_groups.py holds this rule to the
    # stored sweep of every (groups, splits) choice.
    group_min_units: int = 16
    # Decode programs one H100 SM holds at once, by head_dim: head_dim 64 and 128 take 232-255 registers in row groups
    # (2 x 4 warps), 256 needs 147 KB of shared memory (1 x 8 warps; compile_stats.py prints both). Decode splits fill
    # one such wave: more programs than an SM holds wait for a second wave, and every split adds partials to merge;
    # fewer leave SMs idle.
    decode_programs_per_sm: dict = field(default_factory=lambda: {64: 2, 96: 2, 128: 2, 256: 1})
    # ... and of the one-tile-at-a-time split build (tile_groups 1, splits > 1), by (head_dim, model dtype, GQA group
    # size), where it holds 3 x 4 warps per SM (at most 168 registers, with the caps of one_tile_maxnreg where ptxas
    # would take more). These decodes take any split count of one_tile_splits that fits such a wave, not only powers
    # of two, so a split walks fewer units. test_compile_sm90 checks that the listed builds fit.
    decode_programs_per_sm_one_tile: dict = field(default_factory=lambda: {
        (head_dim, dtype, n_rep): 3 for head_dim in (64, 128) for dtype in (torch.bfloat16, torch.float16)
        for n_rep in range(1, 17)})
    # Register caps of one-tile split builds (decode, tile_groups 1, splits > 1), keyed as above. Not bfloat16 GQA 4:
    # it fits in 168 uncapped, and the cap changes its build (1081 -> 1130 instructions per tile-loop iteration).
    one_tile_maxnreg: dict = field(default_factory=lambda: {
        **{(128, torch.bfloat16, n_rep): 168 for n_rep in range(1, 17) if n_rep != 4},
        **{(128, torch.float16, n_rep): 168 for n_rep in range(1, 17)}})
    one_tile_splits: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    # Dot dtypes that take the mantissa-OR code conversion with the offset removed algebraically (`code_conversion`).
    # Not float16: its offset 1024 cancels ~10 bits inside the tensor-core sums (chunk outputs lost precision on an
    # H100); float16 takes F16_SUB_ASM instead, which removes the offset before the dot. Tests add float16 to
    # exercise the path.
    magic_dtypes: frozenset = frozenset({tl.bfloat16})
    # float16 dots on NVIDIA at head_dim <= 128 take the PTX path that subtracts the offset in registers (F16_SUB_ASM);
    # False: plain conversion (I2F, a quarter-rate pipe: one per code) everywhere. head_dim 256 keeps the plain
    # conversion: its sm_90 row-group build spilled more with the PTX path.
    f16_asm: bool = True
    # Programmatic dependent launch of the split merge (Hopper and later, CUDA): each attention program, after its last
    # store, lets the merge launch start; the merge waits for the whole attention launch's writes in-kernel
    # (griddepcontrol.wait), so its launch overlaps the attention launch's last programs. Triggering at the start of
    # each program instead was slower: the waiting merge programs took SM slots.
    pdl: bool = True


TUNING = Tuning()


def launch_options(rows: int, head_dim: int, dot: tl.dtype = tl.bfloat16, groups: int = 1, n_rep: int = 0,
                   splits: int = 1, decode: bool = False, tuning: Tuning | None = None) -> dict:
    """Launch options of the attention kernel for `rows` (query, head) rows per program (16: decode), tensor-core
    operand dtype `dot`, `groups` row groups (`tile_groups`), GQA group size `n_rep` and `splits` splits; decode: a
    decode build (one query per sequence, no new tokens), which `Tuning.one_tile_maxnreg` may cap."""
    t = tuning or TUNING
    if rows > 16:
        return t.chunk_launch_options
    if groups > 1 and head_dim == 128:
        return t.launch_options_groups
    if head_dim > 128:
        return t.launch_options_d256
    # float32 models' IEEE dots spill anyway; a register cap would only make them spill more.
    options = t.launch_options_d64 if head_dim <= 64 and dot != tl.float32 else t.launch_options
    cap = t.one_tile_maxnreg.get((head_dim, _TORCH_DTYPE[dot], n_rep)) if decode and splits > 1 else None
    return {**options, "maxnreg": cap} if cap else options


def tile_groups(rows: int, n_rep: int, block_m: int, units_per_split: int,
                dtype: torch.dtype = torch.bfloat16, tuning: Tuning | None = None) -> int:
    """Row groups of a decode program (`_attend_tile_group`): its 16 rows hold the GQA group's query heads padded
    to a power of two, so ROWS // that many copies attend that many tiles at once: `Tuning.max_tile_groups` where that
    many fit (GQA up to 4), else 1 (2 groups of a GQA-4 group were no faster than one tile at a time on an H100, so
    GQA 8 is not grouped).

    Splits with fewer than `Tuning.group_min_units` units take one tile at a time: a group iteration takes longer than a
    one-tile iteration (latency, which a short split is bound by), and a split's run of units is rounded up to whole
    groups. Chunks (block_m > 1) fill their rows with queries, and float32 models' IEEE dots already spill at one
    tile: 1."""
    t = tuning or TUNING
    if block_m > 1 or dtype == torch.float32 or units_per_split < t.group_min_units:
        return 1
    return t.max_tile_groups if rows // triton.next_power_of_2(n_rep) >= t.max_tile_groups else 1


def merge_meta(splits: int, head_dim: int, unrotate: bool = False) -> dict:
    """Constexprs and launch options of the merge kernel (one row per program, all `splits` in one load); unrotate:
    it un-rotates the outputs the attention kernel left rotated (`merge_unrotates`), in one warp: its reductions and
    reshapes then cross no warps (no barriers), which made it faster on an H100; the plain merge gained nothing from
    one warp. Past 48 splits of 128 dimensions one warp's registers spill: two."""
    p2 = triton.next_power_of_2(splits)
    if unrotate:
        warps = 1 if splits * head_dim <= 48 * 128 else 2
    else:
        warps = 4 if p2 * head_dim <= 8192 else 8
    return {"NUM_SPLITS": splits, "SPLITS_P2": p2, "D": head_dim, "UNROTATE": unrotate, "num_warps": warps}


def merge_unrotates(splits: int, groups: int, head_dim: int, block_m: int, has_new: bool) -> bool:
    """Whether a launch's split outputs may stay in the rotated frame for the merge to un-rotate (the kernel's
    ROT_PARTS): decodes (one query, no new tokens) that take one tile at a time over several splits, head_dim <= 128.
    Their splits are short (a few tiles), so the un-rotation (two [16, D] x [D, D] dots per split) was a large share of
    each. Splits holding 16-bit tokens still un-rotate their tiles' share themselves (the two frames meet in the split's
    output), and row-group builds are left alone: without the un-rotation ptxas allocated their registers differently
    and long contexts ran slower. Powers of two only (the merge's Sylvester factoring): head_dim 96 un-rotates in the
    attention kernel."""
    return (splits > 1 and groups == 1 and block_m == 1 and not has_new and head_dim <= 128
            and head_dim == padded_dim(head_dim))


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
def _channel_mask(mask, ch, D: tl.constexpr):
    """mask & (ch < D) where D is padded (head_dim 96), else mask itself."""
    if padded_dim(D) != D:
        mask = mask & (ch < D)
    return mask


@triton.jit
def _attend_dense(q, k_ptr, v_ptr, stride_tok, n_valid, key_pos0, q_pos, row_ok, m_i, l_i, acc,
                  sm_scale, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Attend to n_valid 16-bit tokens at k_ptr/v_ptr (token stride stride_tok), BLOCK_N at a time."""
    t = tl.arange(0, BLOCK_N)
    d = tl.arange(0, padded_dim(D))
    for start in range(0, n_valid, BLOCK_N):
        tok_ok = start + t < n_valid
        ld_ok = _channel_mask(tok_ok[:, None], d[None, :], D)
        offs = (start + t)[:, None] * stride_tok + d[None, :]
        k = tl.load(k_ptr + offs, mask=ld_ok, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        visible = row_ok[:, None] & tok_ok[None, :] & ((key_pos0 + start + t)[None, :] <= q_pos[:, None])
        p, alpha, m_i, l_i = _softmax_step(s, visible, m_i, l_i)
        v = tl.load(v_ptr + offs, mask=ld_ok, other=0.0).to(DOT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
    return m_i, l_i, acc


@triton.jit
def _softmax_planes(s0, s1, s2, s3, m_i, l_i):
    """Online-softmax step (log2 units) over a tile's four planes of scores; returns (p0..p3, alpha, m_new, l_new).
    Elementwise across planes first: one cross-thread reduction per tile, not four."""
    m_new = tl.maximum(m_i, tl.max(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p0 = tl.exp2(s0 - m_safe[:, None])
    p1 = tl.exp2(s1 - m_safe[:, None])
    p2 = tl.exp2(s2 - m_safe[:, None])
    p3 = tl.exp2(s3 - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum((p0 + p1) + (p2 + p3), axis=1)
    return p0, p1, p2, p3, alpha, m_new, l_i


# The mantissa-OR conversion of bfloat16 codes, written as PTX on packed registers (GPU only: the interpreter
# never sees MAGIC, its dots are float32). LOP3 immediate 0xEA is (a & b) | c.
BF16_MAGIC_ASM = tl.constexpr(0x4300)
_ASM_PLANE4 = tl.constexpr("{ .reg .b32 t; shr.b32 t, $1, $2; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }")
# 2-bit codes: the two PRMTs spread a register's four bytes into 16-bit halves (the same for every plane: ptxas
# computes them once for the four planes); planes 0-2 are then masked in place (bits 2p, 2p+1 lie inside the
# mantissa: the value is 128 + 4^p·code, and `_v_operand` divides the probabilities by 4^p to match); plane 3 (bits
# 6-7, which reach into the exponent) is shifted down first. Keys shift every plane down (`_plane`'s WEIGHTED): their
# planes share one query operand, so nothing could take a weight off
# (benchmarks/HISTORY.md: the k2v2 key bug).
_ASM_PLANE2 = tl.constexpr(
    "{ .reg .b32 lo, hi; prmt.b32 lo, $2, 0, 0x4140; prmt.b32 hi, $2, 0, 0x4342; shr.b32 lo, lo, $3; "
    "shr.b32 hi, hi, $3; lop3.b32 $0, lo, $7, 0x43004300, 0xEA; lop3.b32 $1, hi, $7, 0x43004300, 0xEA; }")

# float16: the code OR-ed into 1024.0's mantissa, then 1024 subtracted in the same registers (sub.f16x2:
# exact), so the dot gets the code itself. The offset must not reach the dot: summed with the codes inside the tensor
# cores it cost float16 outputs ~10 bits (see `Tuning.magic_dtypes`). 2-bit planes are shifted down (float16's 1024
# has an ulp of 1, so a plane weight 4^p would have to come off the probabilities, which can underflow in float16). The
# marker is not an OR constant: the kernel's OFFSET is 0 on this path.
F16_SUB_ASM = tl.constexpr(0x16400)
_ASM_PLANE4_F16 = tl.constexpr(
    "{ .reg .b32 t, m; shr.b32 t, $1, $2; lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA; mov.b32 m, 0x64006400; "
    "sub.rn.f16x2 $0, t, m; }")
_ASM_PLANE2_F16 = tl.constexpr(
    "{ .reg .b32 lo, hi, m; prmt.b32 lo, $2, 0, 0x4140; prmt.b32 hi, $2, 0, 0x4342; shr.b32 lo, lo, $3; "
    "shr.b32 hi, hi, $3; lop3.b32 lo, lo, 0x00030003, 0x64006400, 0xEA; lop3.b32 hi, hi, 0x00030003, 0x64006400, 0xEA; "
    "mov.b32 m, 0x64006400; sub.rn.f16x2 $0, lo, m; sub.rn.f16x2 $1, hi, m; }")


@triton.jit
def _plane(words, PLANE: tl.constexpr, BITS: tl.constexpr, DOT: tl.constexpr, MAGIC: tl.constexpr,
           WEIGHTED: tl.constexpr):
    """Plane PLANE of code words [R, W] (tokens PLANE*W + j) as DOT values code + offset.

    With MAGIC (a 16-bit float's exponent bits, e.g. 0x4300 = 128.0 in bfloat16) the code is OR-ed into the
    mantissa: the value is MAGIC's float + code, exact, in integer ops and a free bitcast; the caller
    removes the offset algebraically. Without MAGIC the code is converted (offset 0).

    WEIGHTED (values only): on the bfloat16 PTX path 2-bit planes 0-2 may come as offset + 4^PLANE·code (masked in
    place, no shift), which `_v_operand` compensates in the probabilities. Keys pass False: one query operand
    serves all four planes of a tile, so each plane's codes must come unweighted (shifted down first).
    """
    # Both branches in one if/else: Triton's code generator still compiles statements after an early return.
    if MAGIC == BF16_MAGIC_ASM:
        # PTX on packed registers: one shift and one LOP3 per two codes (4-bit codes in int16 words); two LOP3s per
        # four 2-bit codes (bytes), plus two PRMTs per register shared by its four planes and two shifts for value
        # plane 3 and key planes 1-3. Triton's own lowering spends ~5 ops per code. Shifts and masks are constant
        # operands: ptxas folds them into immediates.
        if BITS == 4:
            shift = tl.full(words.shape, PLANE * BITS, tl.int32)
            out = tl.inline_asm_elementwise(_ASM_PLANE4, "=r,r,r,r", [words, shift], dtype=tl.bfloat16,
                                            is_pure=True, pack=2)
        else:
            if WEIGHTED and PLANE < 3:
                shift = tl.full(words.shape, 0, tl.int32)
                mask = tl.full(words.shape, 0x00030003 << (2 * PLANE), tl.int32)
            else:
                shift = tl.full(words.shape, 2 * PLANE, tl.int32)
                mask = tl.full(words.shape, 0x00030003, tl.int32)
            out = tl.inline_asm_elementwise(_ASM_PLANE2, "=r,=r,r,r,r,r,r,r,r,r,r", [words, shift, mask],
                                            dtype=tl.bfloat16, is_pure=True, pack=4)
    elif MAGIC == F16_SUB_ASM:
        shift = tl.full(words.shape, PLANE * BITS, tl.int32)
        if BITS == 4:
            out = tl.inline_asm_elementwise(_ASM_PLANE4_F16, "=r,r,r,r", [words, shift], dtype=tl.float16,
                                            is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(_ASM_PLANE2_F16, "=r,=r,r,r,r,r,r", [words, shift], dtype=tl.float16,
                                            is_pure=True, pack=4)
    else:
        c = (words.to(tl.int32) >> (PLANE * BITS)) & (2**BITS - 1)
        if MAGIC == 0:
            out = c.to(DOT)
        else:
            out = (c | MAGIC).to(tl.int16).to(DOT, bitcast=True)
    return out


@triton.jit
def _v_operand(p, row_scale, PLANE: tl.constexpr, VBITS: tl.constexpr, DOT: tl.constexpr, MAGIC: tl.constexpr):
    """p · row_scale [R, W] (float32) as the V dot's DOT operand, divided by the weight `_plane` gives plane PLANE's
    codes (4^PLANE for 2-bit planes 0-2 on the PTX path, else 1): a power of two, so the product with the plane's
    values is the unscaled one exactly."""
    if MAGIC == BF16_MAGIC_ASM and VBITS == 2 and PLANE < 3:
        pr = (p * (row_scale * (1.0 / (1 << (2 * PLANE))))).to(DOT)
    else:
        pr = (p * row_scale).to(DOT)
    return pr


@triton.jit
def _tile_scores(qs, kw, scales_ptr, PLANE: tl.constexpr, W: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr,
                 DOT: tl.constexpr, MAGIC: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_d qs[r, d]·(code[d, t] + offset) for the W tokens of one plane, scaled by their column scales."""
    G: tl.constexpr = 4 * W
    tok = PLANE * W + tl.arange(0, W)
    s = tl.dot(qs, _plane(kw, PLANE, KBITS, DOT, MAGIC, False), input_precision=PRECISION)
    # abs: col_scale[0]'s sign is the K-frame flag.
    return s, tl.abs(tl.load(scales_ptr + scale_offset("k_col_scale", D, G) + tok).to(tl.float32))


@triton.jit
def _tile_values(pv, p, vw, row_zero, scales_ptr, PLANE: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                 D: tl.constexpr, VBITS: tl.constexpr, DOT: tl.constexpr, MAGIC: tl.constexpr, OFFSET: tl.constexpr,
                 PRECISION: tl.constexpr):
    """pv += Σ_t p[r, t]·row_scale[t]·(code[:, t] + offset) over one plane's W tokens; also returns the
    per-element terms whose row sums complete the value rows (row zeros, minus the offset)."""
    tok = PLANE * W + tl.arange(0, W)
    pr = _v_operand(p, tl.load(scales_ptr + scale_offset("v_row_scale", D, G) + tok).to(tl.float32)[None, :], PLANE,
                    VBITS, DOT, MAGIC)
    pv = tl.dot(pr, tl.trans(_plane(vw, PLANE, VBITS, DOT, MAGIC, True)), pv, input_precision=PRECISION)
    return pv, p * row_zero.to(tl.float32)[None, :] - OFFSET * pr.to(tl.float32)


@triton.jit
def _tile_extras(scales_ptr, G: tl.constexpr, D: tl.constexpr):
    """The scales of a tile that feed no dot (K row zeros, V column scales, V row zeros per plane). Triton's
    pipeliner leaves such loads in place, so the tile loop loads them one tile ahead itself."""
    W: tl.constexpr = G // 4
    d = tl.arange(0, padded_dim(D))
    t = tl.arange(0, W)
    vz = scales_ptr + scale_offset("v_row_zero", D, G) + t
    return (load_channels(scales_ptr + scale_offset("k_row_zero", D, G) + d, d, D),
            load_channels(scales_ptr + scale_offset("v_col_scale", D, G) + d, d, D),
            tl.load(vz), tl.load(vz + W), tl.load(vz + 2 * W), tl.load(vz + 3 * W))


@triton.jit
def _attend_tile(q_rot, q_plain, kw_ptr, vw_ptr, scales_ptr, k_row_zero, v_col_scale, vz0, vz1, vz2, vz3,
                 key_pos0, q_pos, row_ok, m_i, l_i, acc, sm_scale_log2, G: tl.constexpr, D: tl.constexpr,
                 ROWS: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, DOT: tl.constexpr,
                 MAGIC: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr):
    """Attend to one packed tile straight from its codes; the output accumulates in the rotated frame.

    Word j of a channel holds tokens j, j+W, j+2W, j+3W (W = G/4): each bit plane is W consecutive tokens,
    so the tile is four [D, W] operands, never a [D, G] unpacked copy (register pressure limits this kernel).
    """
    W: tl.constexpr = G // 4
    d = tl.arange(0, padded_dim(D))
    w_offs = d[:, None] * W + tl.arange(0, W)[None, :]
    # Scales that feed a dot are loaded broadcast over the ROWS rows: at 16 bytes per thread (not 2) Triton's
    # pipeliner turns them into asynchronous copies issued a tile ahead (1-D [D] loads stalled every tile).
    # K-frame flag (format v2): a negative col_scale[0] marks a K stored unrotated; score it with plain q.
    rows0 = (tl.arange(0, ROWS) * 0)[:, None]
    flag = tl.load(scales_ptr + k_frame_flag_offset(D, G) + rows0 + tl.arange(0, 2)[None, :])
    k_rotated = k_frame_is_rotated(tl.split(flag)[0])
    qk = tl.where(k_rotated[:, None], q_rot, q_plain.to(tl.float32))
    t = tl.arange(0, W)
    qs = (qk * load_channels(scales_ptr + scale_offset("k_row_scale", D, G) + rows0 + d[None, :], d[None, :],
                              D).to(tl.float32)).to(DOT)
    zero_term = tl.sum(qk * k_row_zero.to(tl.float32)[None, :] - OFFSET * qs.to(tl.float32), axis=1)
    kw = load_channels(kw_ptr + w_offs, d[:, None], D)
    s0, c0 = _tile_scores(qs, kw, scales_ptr, 0, W, D, KBITS, DOT, MAGIC, PRECISION)
    s1, c1 = _tile_scores(qs, kw, scales_ptr, 1, W, D, KBITS, DOT, MAGIC, PRECISION)
    s2, c2 = _tile_scores(qs, kw, scales_ptr, 2, W, D, KBITS, DOT, MAGIC, PRECISION)
    s3, c3 = _tile_scores(qs, kw, scales_ptr, 3, W, D, KBITS, DOT, MAGIC, PRECISION)
    # Scores in log2 units (sm_scale·log2(e) folded into the column scales; exp2 below): the tile state's
    # m is in log2 units too and the kernel converts it once, after the tile loop.
    s0 = (s0 + zero_term[:, None]) * (c0 * sm_scale_log2)[None, :]
    s1 = (s1 + zero_term[:, None]) * (c1 * sm_scale_log2)[None, :]
    s2 = (s2 + zero_term[:, None]) * (c2 * sm_scale_log2)[None, :]
    s3 = (s3 + zero_term[:, None]) * (c3 * sm_scale_log2)[None, :]
    if MASK:
        # Chunks: padded rows, and (bottom-right causal) a query placed before the tile, which needs n_new < q_len
        # (never produced by the front-ends). Decode (one query, no new tokens) skips both: its query follows every
        # tile, and a padded row (zero query, never stored) cannot disturb the real rows.
        s0 = tl.where(row_ok[:, None] & ((key_pos0 + t)[None, :] <= q_pos[:, None]), s0, float("-inf"))
        s1 = tl.where(row_ok[:, None] & ((key_pos0 + W + t)[None, :] <= q_pos[:, None]), s1, float("-inf"))
        s2 = tl.where(row_ok[:, None] & ((key_pos0 + 2 * W + t)[None, :] <= q_pos[:, None]), s2, float("-inf"))
        s3 = tl.where(row_ok[:, None] & ((key_pos0 + 3 * W + t)[None, :] <= q_pos[:, None]), s3, float("-inf"))
    p0, p1, p2, p3, alpha, m_new, l_i = _softmax_planes(s0, s1, s2, s3, m_i, l_i)
    vw = load_channels(vw_ptr + w_offs, d[:, None], D)
    pv = tl.zeros_like(acc)
    pv, z0 = _tile_values(pv, p0, vw, vz0, scales_ptr, 0, W, G, D, VBITS, DOT, MAGIC, OFFSET, PRECISION)
    pv, z1 = _tile_values(pv, p1, vw, vz1, scales_ptr, 1, W, G, D, VBITS, DOT, MAGIC, OFFSET, PRECISION)
    pv, z2 = _tile_values(pv, p2, vw, vz2, scales_ptr, 2, W, G, D, VBITS, DOT, MAGIC, OFFSET, PRECISION)
    pv, z3 = _tile_values(pv, p3, vw, vz3, scales_ptr, 3, W, G, D, VBITS, DOT, MAGIC, OFFSET, PRECISION)
    pv = pv + tl.sum((z0 + z1) + (z2 + z3), axis=1)[:, None]
    acc = acc * alpha[:, None] + pv * v_col_scale.to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def _group_extras(bt, i, last_tile, grp, head_scales, scales_sb, G: tl.constexpr, D: tl.constexpr):
    """`_tile_extras` of tiles i + grp, one tile per row group: K row zeros and V column scales [ROWS, D], V row zeros
    [ROWS, G // 4] per plane. The group loop loads them one group ahead (before, each iteration waited on them: ~17 %
    of the stall samples at batch 64 x 16K on an H100)."""
    blk = tl.load(bt + tl.minimum(i + grp, last_tile - 1)).to(tl.int64)
    return _tile_extras((head_scales + blk * scales_sb)[:, None], G, D)


@triton.jit
def _attend_tile_group(q_rot, q_plain, bt, i, last_tile, grp, k_base, v_base, head_scales, scales_sb, kw_sb, vw_sb,
                       k_row_zero, v_col_scale, vz0, vz1, vz2, vz3,
                       m_i, l_i, acc, sm_scale_log2, G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                       TG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, DOT: tl.constexpr,
                       MAGIC: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """Attend to tiles i .. i+TG-1 at once, tile i+g in row group g (decode: a row group is the GQA group's query
    heads, one copy per group), each group with its own online-softmax state; the caller merges the groups.

    A decode program has one query per query head, padded to the 16 rows a tensor-core dot needs; here the padding
    rows attend other tiles instead. Every per-tile scale is loaded per row (its group's tile), so the query scaling,
    the zero terms, the softmax and the probability conversions run once for TG tiles. The dots still run per tile
    over all rows and each row keeps its own group's result (a select), as many dots as one tile at a time.
    Tiles past last_tile (the split's last group) read the last tile again and are masked out.
    """
    W: tl.constexpr = G // 4
    d = tl.arange(0, padded_dim(D))
    t = tl.arange(0, W)
    w_offs = d[:, None] * W + t[None, :]
    tile = i + grp
    blk = tl.load(bt + tl.minimum(tile, last_tile - 1)).to(tl.int64)
    sc = (head_scales + blk * scales_sb)[:, None]
    flag = tl.load(sc + k_frame_flag_offset(D, G) + tl.arange(0, 2)[None, :])
    k_rotated = k_frame_is_rotated(tl.split(flag)[0])
    qk = tl.where(k_rotated[:, None], q_rot, q_plain.to(tl.float32))
    qs = (qk * load_channels(sc + scale_offset("k_row_scale", D, G) + d[None, :], d[None, :], D).to(tl.float32)).to(
        DOT)
    zero_term = tl.sum(qk * k_row_zero.to(tl.float32) - OFFSET * qs.to(tl.float32), axis=1)
    s0 = tl.zeros([ROWS, W], tl.float32)
    s1 = s0
    s2 = s0
    s3 = s0
    for g in tl.static_range(TG):
        kw = load_channels(k_base + tl.load(bt + tl.minimum(i + g, last_tile - 1)).to(tl.int64) * kw_sb + w_offs,
                            d[:, None], D)
        sel = (grp == g)[:, None]
        s0 = tl.where(sel, tl.dot(qs, _plane(kw, 0, KBITS, DOT, MAGIC, False), input_precision=PRECISION), s0)
        s1 = tl.where(sel, tl.dot(qs, _plane(kw, 1, KBITS, DOT, MAGIC, False), input_precision=PRECISION), s1)
        s2 = tl.where(sel, tl.dot(qs, _plane(kw, 2, KBITS, DOT, MAGIC, False), input_precision=PRECISION), s2)
        s3 = tl.where(sel, tl.dot(qs, _plane(kw, 3, KBITS, DOT, MAGIC, False), input_precision=PRECISION), s3)
    # Scores in log2 units (as in _attend_tile); tiles past the split's end score −inf.
    cs = sc + scale_offset("k_col_scale", D, G) + t[None, :]
    ok = (tile < last_tile)[:, None]
    s0 = tl.where(ok, (s0 + zero_term[:, None]) * (tl.abs(tl.load(cs).to(tl.float32)) * sm_scale_log2), float("-inf"))
    s1 = tl.where(ok, (s1 + zero_term[:, None]) * (tl.abs(tl.load(cs + W).to(tl.float32)) * sm_scale_log2),
                  float("-inf"))
    s2 = tl.where(ok, (s2 + zero_term[:, None]) * (tl.abs(tl.load(cs + 2 * W).to(tl.float32)) * sm_scale_log2),
                  float("-inf"))
    s3 = tl.where(ok, (s3 + zero_term[:, None]) * (tl.abs(tl.load(cs + 3 * W).to(tl.float32)) * sm_scale_log2),
                  float("-inf"))
    p0, p1, p2, p3, alpha, m_new, l_i = _softmax_planes(s0, s1, s2, s3, m_i, l_i)
    # V: p · row_scale[t] as the dots' operands; p · row_zero[t] − offset · those as the rows' constant terms.
    vs = sc + scale_offset("v_row_scale", D, G) + t[None, :]
    pr0 = _v_operand(p0, tl.load(vs).to(tl.float32), 0, VBITS, DOT, MAGIC)
    pr1 = _v_operand(p1, tl.load(vs + W).to(tl.float32), 1, VBITS, DOT, MAGIC)
    pr2 = _v_operand(p2, tl.load(vs + 2 * W).to(tl.float32), 2, VBITS, DOT, MAGIC)
    pr3 = _v_operand(p3, tl.load(vs + 3 * W).to(tl.float32), 3, VBITS, DOT, MAGIC)
    z = ((p0 * vz0.to(tl.float32) - OFFSET * pr0.to(tl.float32))
         + (p1 * vz1.to(tl.float32) - OFFSET * pr1.to(tl.float32))) \
        + ((p2 * vz2.to(tl.float32) - OFFSET * pr2.to(tl.float32))
           + (p3 * vz3.to(tl.float32) - OFFSET * pr3.to(tl.float32)))
    pv = tl.zeros_like(acc)
    for g in tl.static_range(TG):
        vw = load_channels(v_base + tl.load(bt + tl.minimum(i + g, last_tile - 1)).to(tl.int64) * vw_sb + w_offs,
                            d[:, None], D)
        pg = tl.dot(pr0, tl.trans(_plane(vw, 0, VBITS, DOT, MAGIC, True)), input_precision=PRECISION)
        pg = tl.dot(pr1, tl.trans(_plane(vw, 1, VBITS, DOT, MAGIC, True)), pg, input_precision=PRECISION)
        pg = tl.dot(pr2, tl.trans(_plane(vw, 2, VBITS, DOT, MAGIC, True)), pg, input_precision=PRECISION)
        pg = tl.dot(pr3, tl.trans(_plane(vw, 3, VBITS, DOT, MAGIC, True)), pg, input_precision=PRECISION)
        pv = tl.where((grp == g)[:, None], pg, pv)
    pv = pv + tl.sum(z, axis=1)[:, None]
    acc = acc * alpha[:, None] + pv * v_col_scale.to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _merge_groups(m, l, acc, TG: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Log-sum-exp merge of the TG row groups' states (m in log2 units, acc [ROWS, D]) into each group's rows: every
    row ends up holding its head's state over all the groups' tiles."""
    GS: tl.constexpr = ROWS // TG
    DP: tl.constexpr = padded_dim(D)
    m3 = tl.reshape(m, [TG, GS])
    m_all = tl.max(m3, axis=0)
    w = tl.exp2(m3 - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])  # 0 where a group saw no tile
    l_all = tl.sum(tl.reshape(l, [TG, GS]) * w, axis=0)
    acc_all = tl.sum(tl.reshape(acc, [TG, GS, DP]) * w[:, :, None], axis=0)
    m = tl.reshape(tl.broadcast_to(m_all[None, :], [TG, GS]), [ROWS])
    l = tl.reshape(tl.broadcast_to(l_all[None, :], [TG, GS]), [ROWS])
    acc = tl.reshape(tl.broadcast_to(acc_all[None, :, :], [TG, GS, DP]), [ROWS, DP])
    return m, l, acc


@triton.jit
def _paged_attention_kernel(
    q, hadamard_ptr, stride_qt, stride_qh,
    k_new, v_new, stride_nt, stride_nh,
    cu_q, cu_k, seq_lens, block_table, stride_bt, dense_table,
    k_words, v_words, scales, kw_sb, kw_sh, vw_sb, vw_sh, scales_sb, scales_sh,
    sink_k, sink_v, tail_k, tail_v, stride_db, stride_dh,
    part, part_lse, out, stride_ps, stride_pt, stride_ph,
    sm_scale,
    N_REP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, HAS_NEW: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, DENSE_BLOCK: tl.constexpr, MAGIC: tl.constexpr,
    OFFSET: tl.constexpr, UNROTATE_F32: tl.constexpr, TG: tl.constexpr, DU: tl.constexpr, PDL: tl.constexpr = False,
    ROT_PARTS: tl.constexpr = False,
):
    b = tl.program_id(0)
    m_block = tl.program_id(1)
    kvh = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q_start
    if TG > 1:
        # Row groups: all of a sequence's metadata in one memory round trip. The early return also tests hist (never
        # negative), so the compiler cannot sink its load behind the branch (two dependent round trips otherwise). One
        # tile at a time the same order was slower (ptxas allocated registers differently).
        hist = tl.load(seq_lens + b)
        if (m_block * BLOCK_M >= q_len) | (hist < 0):
            return
    else:
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
    if TG > 1:
        # Decode in TG row groups of ROWS // TG rows (`_attend_tile_group`): every group holds the GQA group's
        # queries, group g attends tiles g, g + TG, ...; only group 0's rows are stored.
        grp = r // (ROWS // TG)
        m_idx = r * 0
        head = kvh * N_REP + r % (ROWS // TG)
        q_ok = (r % (ROWS // TG) < N_REP) & (m_idx < q_len)
        row_ok = q_ok & (grp == 0)
    else:
        grp = r * 0
        m_idx = m_block * BLOCK_M + r // N_REP
        head = kvh * N_REP + r % N_REP
        row_ok = (r // N_REP < BLOCK_M) & (m_idx < q_len)
        q_ok = row_ok
    q_pos = hist + n_new - q_len + m_idx  # bottom-right causal over [history, new tokens]
    DP: tl.constexpr = padded_dim(D)  # head_dim 96 runs 128 wide, its padded channels masked
    d = tl.arange(0, DP)
    q_offs = (q_start + m_idx).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]

    # Two online-softmax states, merged at the end: quantized tiles (rotated frame) and 16-bit tokens.
    m_q = tl.full([ROWS], float("-inf"), tl.float32)
    l_q = tl.zeros([ROWS], tl.float32)
    acc_q = tl.zeros([ROWS, DP], tl.float32)
    m_d = tl.full([ROWS], float("-inf"), tl.float32)
    l_d = tl.zeros([ROWS], tl.float32)
    acc_plain = tl.zeros([ROWS, DP], tl.float32)

    rest = tl.maximum(hist - G, 0)
    n_tiles = rest // G
    tail_pos = G * (1 + n_tiles)
    # The sequence's work in units, spread evenly over the splits: its 16-bit sink (units 0..DU-1), its tiles (tile i
    # is unit DU + i), then its 16-bit tail with the new tokens, DU units per G of their tokens (rounded up; none when
    # there are none). A 16-bit block of G tokens weighs DU units (`Tuning.dense_units`) against a packed tile's 1, so
    # the splits that attend the sink or the tail take fewer tiles. With row groups a split's run is a multiple of TG
    # units, so that its tile groups are full (but the first). DU = 1 (chunks: see `Tuning.dense_units`) keeps one unit
    # per block, the tail's always there.
    if DU == 1:
        units = n_tiles + 2
    else:
        units = DU + n_tiles + tl.cdiv((tl.maximum(hist - tail_pos, 0) + n_new) * DU, G)
    per_split = tl.cdiv(tl.cdiv(units, NUM_SPLITS), TG) * TG
    u0 = split * per_split
    u1 = tl.minimum(u0 + per_split, units)
    first_tile = tl.maximum(u0 - DU, 0)
    last_tile = tl.minimum(u1 - DU, n_tiles)
    # ROT_PARTS: a split attending no 16-bit token (neither the sink's first unit nor the tail's) leaves its output in
    # the rotated frame; the merge un-rotates the sum of such splits' outputs once (see `merge_unrotates`).
    plain_frame = (u0 == 0) | ((u0 <= DU + n_tiles) & (DU + n_tiles < u1))
    # Loaded once: the offsets tensor is dead before the tile loop (registers are what limit this kernel).
    qp = tl.load(q + q_offs, mask=_channel_mask(q_ok[:, None], d[None, :], D), other=0.0).to(DOT)
    if first_tile < last_tile:
        # q·H in-kernel: ±1 entries make the 16-bit products exact; 1/sqrt(D) is applied in float32.
        h_offs = d[:, None] * DP + d[None, :]
        qr = tl.dot(qp, tl.load(hadamard_ptr + h_offs),
                    input_precision=PRECISION) * (1.0 / tl.sqrt(D * 1.0))
        bt = block_table + b.to(tl.int64) * stride_bt
        head_scales = scales + kvh * scales_sh
        if TG > 1:
            k_rz, v_cs, vz0, vz1, vz2, vz3 = _group_extras(bt, first_tile, last_tile, grp, head_scales, scales_sb,
                                                           G, D)
            for i in range(first_tile, last_tile, TG):
                # The next group's non-dot scales now (past the split's end: its last tile again, harmless).
                k_rz1, v_cs1, vz01, vz11, vz21, vz31 = _group_extras(bt, i + TG, last_tile, grp, head_scales,
                                                                     scales_sb, G, D)
                m_q, l_q, acc_q = _attend_tile_group(
                    qr, qp, bt, i, last_tile, grp, k_words + kvh * kw_sh, v_words + kvh * vw_sh, head_scales,
                    scales_sb, kw_sb, vw_sb, k_rz, v_cs, vz0, vz1, vz2, vz3, m_q, l_q, acc_q, sm_scale * LOG2E, G,
                    D, ROWS, TG, KBITS, VBITS, DOT, MAGIC, OFFSET, PRECISION)
                k_rz, v_cs, vz0, vz1, vz2, vz3 = k_rz1, v_cs1, vz01, vz11, vz21, vz31
            m_q, l_q, acc_q = _merge_groups(m_q, l_q, acc_q, TG, ROWS, D)
        else:
            k_rz, v_cs, vz0, vz1, vz2, vz3 = _tile_extras(
                head_scales + tl.load(bt + first_tile).to(tl.int64) * scales_sb, G, D)
            next_block = tl.load(bt + tl.minimum(first_tile + 1, last_tile - 1)).to(tl.int64)
            for i in range(first_tile, last_tile):
                block = tl.load(bt + i).to(tl.int64)
                # Tile i+1's non-dot scales now (the last iteration reloads its own: harmless), used next iteration.
                k_rz1, v_cs1, vz01, vz11, vz21, vz31 = _tile_extras(head_scales + next_block * scales_sb, G, D)
                next_block = tl.load(bt + tl.minimum(i + 2, last_tile - 1)).to(tl.int64)
                m_q, l_q, acc_q = _attend_tile(
                    qr, qp, k_words + block * kw_sb + kvh * kw_sh, v_words + block * vw_sb + kvh * vw_sh,
                    head_scales + block * scales_sb, k_rz, v_cs, vz0, vz1, vz2, vz3, G * (1 + i), q_pos, row_ok,
                    m_q, l_q, acc_q, sm_scale * LOG2E, G, D, ROWS, KBITS, VBITS, DOT, MAGIC, OFFSET, PRECISION,
                    HAS_NEW or BLOCK_M > 1)
                k_rz, v_cs, vz0, vz1, vz2, vz3 = k_rz1, v_cs1, vz01, vz11, vz21, vz31
        m_q = m_q * LN2  # back to natural-log units (−inf stays −inf)
        # Un-rotate here (·H): the merge is then a plain weighted sum that spreads over every row (a dot needs 16 rows
        # per program; batch-1 decode has 32 rows and up to 64 splits). ROT_PARTS (short one-tile decode splits, where
        # these two dots are a large share of the work): only splits whose output also holds 16-bit tokens do; the
        # merge un-rotates the others' sum once per row.
        if ROT_PARTS:
            if plain_frame:
                acc_q = unrotate(acc_q, hadamard_ptr, D, UNROTATE_F32)
        else:
            acc_q = unrotate(acc_q, hadamard_ptr, D, UNROTATE_F32)

    if u0 == 0:
        sink_block = tl.load(dense_table + 2 * b).to(tl.int64)
        base = sink_block * stride_db + kvh * stride_dh
        m_d, l_d, acc_plain = _attend_dense(qp, sink_k + base, sink_v + base, D, tl.minimum(hist, G), 0,
                                            q_pos, row_ok, m_d, l_d, acc_plain, sm_scale, DENSE_BLOCK, D, DOT,
                                            PRECISION)
    if (u0 <= DU + n_tiles) & (DU + n_tiles < u1):  # the split holding the tail's first unit (if it has one)
        tail_block = tl.load(dense_table + 2 * b + 1).to(tl.int64)
        base = tail_block * stride_db + kvh * stride_dh
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
    acc = acc_plain * w_d[:, None] + acc_q * w_q[:, None]
    t_idx = (q_start + m_idx).to(tl.int64)
    out_offs = t_idx[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
    out_ok = _channel_mask(row_ok[:, None], d[None, :], D)
    if NUM_SPLITS == 1:
        # Nothing to merge: the output straight from here (out has part's [T, Hq, D] strides).
        tl.store(out + out_offs, (acc * tl.where(l_i > 0, 1.0 / l_i, 0.0)[:, None]).to(out.dtype.element_ty),
                 mask=out_ok)
    else:
        # The split's normalized output and its log-sum-exp (−inf: it saw no key). Storing acc, m and l instead, ptxas
        # left spill reloads in the split row-group builds' tile loop (head_dim 128), which made long decodes slower.
        # test_compile_sm90 checks that the loop does not spill.
        lse_offs = split * (stride_ps // D) + t_idx * (stride_pt // D) + head * (stride_ph // D)
        tl.store(part_lse + lse_offs, tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf")), mask=row_ok)
        if ROT_PARTS:
            # The frame of this output (1.0: rotated), after the log-sum-exps of every split (part_lse holds 2 * S).
            tl.store(part_lse + NUM_SPLITS * (stride_ps // D) + lse_offs, tl.where(plain_frame, 0.0, 1.0) + l_i * 0.0,
                     mask=row_ok)
        tl.store(part + split * stride_ps + out_offs, acc * tl.where(l_i > 0, 1.0 / l_i, 0.0)[:, None],
                 mask=out_ok)
        if PDL:
            # This program is done: once every program is, the merge launch may start (it waits for this launch's
            # writes itself), so its launch overlaps this launch's last programs instead of following them.
            tl.extra.cuda.gdc_launch_dependents()




@triton.jit
def _sylvester_signs(n: tl.constexpr):
    """The n x n Sylvester Hadamard matrix (±1.0, float32) from its entries' formula (-1)^popcount(i & j): no load."""
    i = tl.arange(0, n)
    v = i[:, None] & i[None, :]
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1.0 - 2.0 * (v & 1).to(tl.float32)


@triton.jit
def _unrotate_vector(y, D: tl.constexpr):
    """y·H/sqrt(D) for one float32 vector y [D] (D <= 256), exact up to float32 sums. The Sylvester matrix factors as
    H_A ⊗ H_B (D = A·B, index a·B + b), so with Y = y as [A, B] the product is H_A·Y·H_B: A·B·(A + B) multiply-adds
    instead of D², on matrices built in registers."""
    B: tl.constexpr = 16 if D >= 128 else 8
    A: tl.constexpr = D // B
    y2 = tl.reshape(y, [A, B])
    z = tl.sum(y2[:, :, None] * _sylvester_signs(B)[None, :, :], axis=1)  # Y·H_B
    r = tl.sum(_sylvester_signs(A)[:, :, None] * z[None, :, :], axis=1)  # H_A·(Y·H_B)
    return tl.reshape(r, [D]) * (1.0 / tl.sqrt(D * 1.0))


@triton.jit
def _merge_splits_kernel(part, part_lse, out, n_rows, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                         D: tl.constexpr, PDL: tl.constexpr = False, UNROTATE: tl.constexpr = False):
    """Merge of one (query, head) row's split outputs [S, rows, D] (normalized), weighted by their log-sum-exps
    [S, rows], stored in out's dtype: all splits in one [S, D] load, so a row costs one memory round trip. PDL:
    launched as a programmatic dependent of the attention launch (see `Tuning.pdl`), it waits for that launch's writes
    before its loads.

    UNROTATE (`merge_unrotates`): part_lse holds 2 * S rows, the second S each output's frame (1.0: left rotated by
    the attention kernel, 0.0: un-rotated there); the weighted sum of the rotated ones is un-rotated here, in float32,
    once per row instead of once per split (`_unrotate_vector`). Otherwise every output is un-rotated already."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, padded_dim(D))  # head_dim 96: 128 wide, padded channels masked
    if PDL:
        tl.extra.cuda.gdc_wait()
    # All loads issued before any use: one memory round trip, not several.
    lse = tl.load(part_lse + s * n_rows + row, mask=s_ok, other=float("-inf"))
    o = tl.load(part + (s[:, None] * n_rows + row) * D + d[None, :], mask=_channel_mask(s_ok[:, None], d[None, :], D),
                other=0.0)
    if UNROTATE:
        rotated = tl.load(part_lse + (NUM_SPLITS + s) * n_rows + row, mask=s_ok, other=0.0)
    m = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(m == float("-inf"), 0.0, m)), 0.0)  # 0: saw no key
    w_tot = tl.sum(w, axis=0)
    if UNROTATE:
        w_rot = w * rotated
        res = tl.sum(o * (w - w_rot)[:, None], axis=0) + _unrotate_vector(tl.sum(o * w_rot[:, None], axis=0), D)
    else:
        res = tl.sum(o * w[:, None], axis=0)
    res = (res * tl.where(w_tot > 0, 1.0 / w_tot, 0.0)).to(out.dtype.element_ty)
    if padded_dim(D) != D:
        tl.store(out + row * D + d, res, mask=d < D)
    else:
        tl.store(out + row * D + d, res)


def choose_num_splits(batch: int, num_kv_heads: int, max_tiles: int, num_sms: int = 132, q_blocks: int = 1,
                      per_sm: int | None = None) -> int:
    """A power of two: enough programs to fill the GPU, none with fewer than MIN_TILES_PER_SPLIT work units (a
    program walks its units one after another, so short contexts want one per program). max_tiles counts the
    longest sequence's work units (its tiles + its sink and tail, see the attention kernel). q_blocks query blocks
    per sequence already multiply the programs (chunks, prefills).

    per_sm (decode): the programs an SM holds at once (`Tuning.decode_programs_per_sm`); the splits stop at one such
    wave (rounded down). None (chunks): at least twice the SMs' count of programs (rounded up)."""
    by_work = triton.next_power_of_2(max(1, max_tiles // MIN_TILES_PER_SPLIT))
    programs = batch * num_kv_heads * max(1, q_blocks)
    wave = max(1, per_sm * num_sms // programs) if per_sm else max(1, math.ceil(2 * num_sms / programs))
    by_occupancy = 1 << (wave.bit_length() - 1)
    return min(by_work, by_occupancy, 64)


def dense_units(has_new: bool, tuning: Tuning | None = None) -> int:
    """Work units per 16-bit block of a launch (the kernel's DU): `Tuning.dense_units` for decode, 1 for chunks."""
    return 1 if has_new else (tuning or TUNING).dense_units


def split_plan(batch: int, num_kv_heads: int, max_tiles: int, head_dim: int, n_rep: int, dtype: torch.dtype,
               num_sms: int, block_m: int = 1, q_blocks: int = 1, num_splits: int | None = None,
               has_new: bool = False, tuning: Tuning | None = None) -> tuple[int, int]:
    """(splits, row groups) of a `paged_attention` launch: `choose_num_splits` (decode: one wave of
    `Tuning.decode_programs_per_sm`) and `tile_groups` for the units a split gets. Splits share out work units (sink,
    tiles, tail: see the kernel), so they are chosen for max_tiles + 2 * dense_units(has_new) units. num_splits: forced
    (tests, sweeps)."""
    t = tuning or TUNING
    units = max_tiles + 2 * dense_units(has_new, t)  # at most (decode counts the tail by its tokens)
    decode = block_m == 1 and dtype != torch.float32
    per_sm = t.decode_programs_per_sm.get(head_dim) if decode else None
    splits = num_splits or choose_num_splits(batch, num_kv_heads, units, num_sms, q_blocks, per_sm)
    rows = max(16, triton.next_power_of_2(block_m * n_rep))
    tg = tile_groups(rows, n_rep, block_m, triton.cdiv(units, splits), dtype, t)
    one_tile_per_sm = t.decode_programs_per_sm_one_tile.get((head_dim, dtype, n_rep))
    if num_splits is None and decode and not has_new and tg == 1 and one_tile_per_sm:
        # Fewer units per split than before (never more), so still one tile at a time. (Single queries with new tokens
        # run the chunk build, whose registers are not counted here.)
        splits = one_tile_splits(batch * num_kv_heads, units, one_tile_per_sm * num_sms, t.one_tile_splits)
    return splits, tg


def one_tile_splits(programs: int, units: int, slots: int, choices: tuple[int, ...] | None = None) -> int:
    """Splits of a one-tile-at-a-time decode of `programs` (sequence, KV head) programs per split and `units` work
    units each, on a GPU that holds `slots` such programs at once: of the split counts `choices` (default
    `Tuning.one_tile_splits`) that fit one wave, the fewest that give the fewest units per split (cdiv(units, splits),
    the walk of the longest split)."""
    fits = [s for s in (choices or TUNING.one_tile_splits) if s * programs <= slots] or [1]
    fewest = min(triton.cdiv(units, s) for s in fits)
    return min(s for s in fits if triton.cdiv(units, s) == fewest)


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
    max_history: int | None = None,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """Varlen attention over the paged KVarN state (see `reference.paged_attention_ref` for semantics).

    q [Tq, Hq, D]; k_new/v_new [Tk, H, D] with cu_seqlens_k; max_q_len bounds every sequence's query count
    and max_history (optional) every sequence's cached length, both host values, so nothing here synchronizes
    with the device. max_history sizes the split-K scratch by the history that exists, not by the width of the
    block table (which a front-end may have reserved ahead). tuning: launch choices (default `TUNING`; benchmarks and
    tests pass variants). Returns [Tq, Hq, D] in q.dtype.
    """
    t = tuning or TUNING
    fmt = state.fmt
    _check_attention_inputs(q, state, cu_seqlens_q, k_new, v_new, cu_seqlens_k)
    if check_tables():
        state.check_tables(max_history)  # debugging: syncs with the device
    if num_splits is None and _dense_chunk(q, state, max_q_len, k_new, max_history, t):
        return _attend_dense_chunk(q, state, cu_seqlens_q, max_q_len, k_new, v_new, cu_seqlens_k, sm_scale,
                                   max_history)
    tq, hq, d = q.shape
    hkv = state.num_kv_heads
    n_rep = hq // hkv
    batch = cu_seqlens_q.numel() - 1
    scale = sm_scale if sm_scale is not None else d**-0.5
    max_tiles = state.max_tiles(max_history)
    # Decode: one query, its GQA group padded to the 16 rows of a tensor-core dot. Chunks: chunk_rows (32 or 64) rows
    # of (query, head) pairs, so each program re-reads the quantized history for that many rows, not 16.
    block_m = max(1, min(t.chunk_rows.get(d, t.chunk_rows_default) // n_rep, triton.next_power_of_2(max_q_len)))
    q_blocks = triton.cdiv(max_q_len, block_m)
    rows = max(16, triton.next_power_of_2(block_m * n_rep))
    has_new = k_new is not None
    splits, tg = split_plan(batch, hkv, max_tiles, d, n_rep, q.dtype, _num_sms(q.device), block_m, q_blocks,
                            num_splits, has_new, t)
    dot = _dot_dtype(q.dtype)
    precision = "ieee" if dot == tl.float32 else "tf32"
    out = torch.empty(tq, hq, d, device=q.device, dtype=q.dtype)
    # One split writes the output itself; more write partials (normalized, with their log-sum-exps; un-rotated unless
    # rot_parts leaves that to the merge) for the merge. (With one split the kernel never touches part, part_lse: `out`
    # stands in for them.)
    part = part_lse = out
    rot_parts = merge_unrotates(splits, tg, d, block_m, has_new)
    if splits > 1:
        part = torch.empty(splits, tq, hq, d, device=q.device, dtype=torch.float32)
        # ROT_PARTS: each output's frame after the S log-sum-exps.
        part_lse = torch.empty((2 if rot_parts else 1) * splits, tq, hq, device=q.device, dtype=torch.float32)
    kn = k_new if has_new else q
    vn = v_new if has_new else q
    k_words, v_words, scales = fmt.word_views(state.cache)
    magic, offset = code_conversion(dot, d, t)
    pdl = _pdl(q.device, t)
    signs = hadamard_signs(d, _TORCH_DTYPE[dot], q.device)
    grid = (batch, q_blocks, hkv * splits)
    _paged_attention_kernel[grid](
        q, signs, q.stride(0), q.stride(1),
        kn, vn, kn.stride(0), kn.stride(1),
        cu_seqlens_q, cu_seqlens_k if has_new else cu_seqlens_q, state.seq_lens,
        state.block_table, state.block_table.stride(0), state.dense_table,
        k_words, v_words, scales, k_words.stride(0), k_words.stride(1), v_words.stride(0), v_words.stride(1),
        scales.stride(0), scales.stride(1),
        state.sink_k, state.sink_v, state.tail_k, state.tail_v, state.sink_k.stride(0), state.sink_k.stride(1),
        part, part_lse, out, tq * hq * d, hq * d, d,
        scale,
        N_REP=n_rep, G=fmt.group, D=d, KBITS=fmt.k_bits, VBITS=fmt.v_bits,
        BLOCK_M=block_m, ROWS=rows, HAS_NEW=has_new, NUM_SPLITS=splits,
        DOT=dot, PRECISION=precision, DENSE_BLOCK=t.dense_block, MAGIC=magic, OFFSET=offset,
        UNROTATE_F32=dot == tl.float32 or interpreted(), TG=tg, DU=dense_units(has_new, t),
        PDL=splits > 1 and pdl, ROT_PARTS=rot_parts,
        **launch_options(rows, d, dot, tg, n_rep, splits, decode=block_m == 1 and not has_new, tuning=t),
    )
    if splits > 1:
        _merge_splits_kernel[(tq * hq,)](part, part_lse, out, tq * hq, **merge_meta(splits, d, rot_parts),
                                         **({"PDL": True, "launch_pdl": True} if pdl else {}))
    return out


def _dense_chunk(q: torch.Tensor, state: PagedKV, max_q_len: int, k_new: torch.Tensor | None,
                 max_history: int | None, tuning: Tuning) -> bool:
    """Whether a call takes the dequantize-once route (see `Tuning.dense_chunk_min_queries`)."""
    if not (tuning.dense_chunks and q.is_cuda and max_q_len >= tuning.dense_chunk_min_queries and not interpreted()
            and q.dtype in (torch.float16, torch.bfloat16) and _varlen_kwargs() is not None):
        return False
    rows = buffer_rows(state, k_new, max_history)
    return 2 * rows * state.num_kv_heads * state.fmt.head_dim * q.element_size() <= tuning.dense_chunk_max_bytes


@functools.lru_cache(maxsize=1)
def _varlen_kwargs() -> dict | None:
    """Keyword arguments that make torch's varlen flash attention causal (bottom-right) with GQA, or None when this
    torch has none (before 2.10)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _attend_dense_chunk(q, state, cu_seqlens_q, max_q_len, k_new, v_new, cu_seqlens_k, sm_scale, max_history):
    from torch.nn.attention.varlen import varlen_attn

    k, v, cu_k, max_k = dense_history(state, q.dtype, k_new, v_new, cu_seqlens_k, max_history)
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    return varlen_attn(q.contiguous(), k, v, cu_seqlens_q, cu_k, max_q_len, max_k, scale=scale, **_varlen_kwargs())


def decode_attention(
    q: torch.Tensor, state: PagedKV, sm_scale: float | None = None, num_splits: int | None = None,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over the whole cached history (the new token is in the tail)."""
    return paged_attention(q, state, _arange_cu(q.shape[0], q.device), 1, sm_scale=sm_scale, num_splits=num_splits,
                           tuning=tuning)


_ARANGE_CU: dict[tuple[int, torch.device], torch.Tensor] = {}


def _arange_cu(batch: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens [0, 1, ..., batch] of one query per sequence, made once per (batch, device): building it per call
    is a kernel launch as long as a short decode's attention, and never freed, since CUDA graphs capture its
    address (an evicted, reallocated copy would be read by stale graphs)."""
    key = (batch, torch.device(device))
    if key not in _ARANGE_CU:
        _ARANGE_CU[key] = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return _ARANGE_CU[key]


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
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """A chunk of new queries per sequence over its quantized history plus its causal 16-bit new tokens."""
    return paged_attention(q, state, cu_seqlens_q, max_q_len, k_new, v_new, cu_seqlens_k, sm_scale, num_splits,
                           tuning=tuning)


# A 16-bit float whose mantissa holds the code: 0x4300 is 128.0 in bfloat16 (7 mantissa bits), 0x6400 is 1024.0
# in float16 (10 bits); OR-ing a code below 128 into it gives offset + code exactly.
_MAGIC = {tl.bfloat16: 0x4300, tl.float16: 0x6400}
_MAGIC_OFFSET = {tl.bfloat16: 128.0, tl.float16: 1024.0}


def code_conversion(dot: tl.dtype, head_dim: int = 128, tuning: Tuning | None = None) -> tuple[int, float]:
    """(MAGIC, OFFSET) of the attention kernel for dot dtype `dot`: the mantissa-OR constant and the offset it
    adds (`Tuning.magic_dtypes`); F16_SUB_ASM and 0.0 for float16 on NVIDIA at head_dim <= 128 (`Tuning.f16_asm`: the
    offset is subtracted before the dot); or (0, 0.0) for plain int→float conversion."""
    t = tuning or TUNING
    # The mantissa-OR paths are inline PTX (NVIDIA only): ROCm builds convert codes plainly.
    if torch.version.hip is not None:
        return 0, 0.0
    if dot in t.magic_dtypes:
        return _MAGIC[dot], _MAGIC_OFFSET[dot]
    if dot == tl.float16 and t.f16_asm and head_dim <= 128:
        return F16_SUB_ASM.value, 0.0
    return 0, 0.0


_TORCH_DTYPE = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float32: torch.float32}


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Tensor-core operand dtype: the model's 16-bit dtype (codes are exact in it); float32 for float32
    models and under the interpreter, whose bfloat16 dots are wrong."""
    if dtype == torch.float32 or interpreted():
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _pdl(device: torch.device, tuning: Tuning) -> bool:
    """Whether `paged_attention` launches the merge as a programmatic dependent on `device` (`Tuning.pdl`, sm_90+)."""
    return tuning.pdl and not interpreted() and _pdl_capable(device)


@functools.lru_cache(maxsize=8)
def _pdl_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


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
