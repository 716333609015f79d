"""Triton kernel: quantize full tiles (rotate + normalize + round + pack) straight into a paged cache.

All tiles of a step go in one launch, grid (tiles, kv_heads, 2): K and V of a tile are separate programs. No
host synchronization. The oracle is `reference.quantize_into_cache_ref`.

How the kernel keeps the reference's semantics at a fraction of its work:
- Rotation: a tensor-core dot with the unnormalized ±1 Hadamard matrix in 16 bits and float32 accumulation
  (products are exact, so it equals the float32 reference up to summation order), then × 1/sqrt(D) in
  float32. float32 inputs are split exactly into three bfloat16 parts first. An identity gather then moves the
  tile out of the tensor cores' lopsided register layout (see `_rotate`).
- K frame (format v2): the raw tile's per-channel range cost comes from the chunks the rotation loads anyway, the
  rotated one from one min/max pass; an unrotated K reloads its tile (masked off when rotated) and is selected
  with tl.where before normalization; the sign of K col_scale[0] records the choice.
- Normalization never materializes a balanced tile. Balancing scales rows by a[r] = exp(-log_r[r]) and columns
  by b[c] = exp(-log_c[c]), so a row's std of the balanced tile is a[r] · std_c(x[r, :] · b) and a column's is
  b[c] · std_r(x[:, c] · a). One iteration therefore takes one pass over the tile per axis (the row stds of
  the new state follow from the same pass by rescaling), and exp/log run on vectors only.
- Each pass takes shifted one-pass moments Σd, Σd² with d = x·scale − shift, where shift is the mean of the
  same row/column from the previous pass: as exact as two passes (the error grows with (mean − shift)²/var,
  which stays small), with one (tuple) reduction instead of two dependent ones. The first state uses exact
  two-pass moments.
- Vector logs use the hardware lg2 (tl.log2 is a polynomial); the guard's spreads, the round-to-nearest ranges,
  the row energies and the NaN poison come from one more pass; the tile is quantized in one last pass, which divides
  by each row's step through its correctly rounded reciprocal (`_row_quotient`: the division's result, 3 operations).
- head_dim 96 runs 128 wide (`padded_dim`): the padded channels load as zeros, rotate to zeros (the ±1 operand is
  zero-padded), are left out of every statistic over channels (means, stds, their max/min ratios, RTN ranges, the
  guard's column sums) and are never stored. Power-of-two head dims skip every mask (constexpr branches): their sm_90
  builds have the instructions they had before (a few ordered differently).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import constants
from .codec import check_k_weights
from .format import KVarNFormat, scale_offset
from .hadamard import hadamard_signs, padded_dim

# The quantizer's constants, as constexprs so that jitted code may read them.
STD_MIN = tl.constexpr(constants.STD_MIN)
STD_MAX = tl.constexpr(constants.STD_MAX)
LOG_SCALE_MIN = tl.constexpr(constants.LOG_SCALE_MIN)
LOG_SCALE_MAX = tl.constexpr(constants.LOG_SCALE_MAX)
RTN_MIN_SCALE = tl.constexpr(constants.RTN_MIN_SCALE)
GUARD_FACTOR = tl.constexpr(constants.GUARD_FACTOR)


# --- reductions ------------------------------------------------------------------------------------
@triton.jit
def _add2(a1, a2, b1, b2):
    return a1 + b1, a2 + b2


@triton.jit
def _min_max(a_lo, a_hi, b_lo, b_hi):
    return tl.minimum(a_lo, b_lo), tl.maximum(a_hi, b_hi)


@triton.jit
def _min_max_nan(a_lo, a_hi, b_lo, b_hi):
    return (tl.minimum(a_lo, b_lo, propagate_nan=tl.PropagateNan.ALL),
            tl.maximum(a_hi, b_hi, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _guard_pass(a1, a_lo, a_hi, a_blo, a_bhi, b1, b_lo, b_hi, b_blo, b_bhi):
    return (a1 + b1, tl.minimum(a_lo, b_lo), tl.maximum(a_hi, b_hi), tl.minimum(a_blo, b_blo),
            tl.maximum(a_bhi, b_bhi))


@triton.jit
def _sums(u, v, AXIS: tl.constexpr, COMPILED: tl.constexpr):
    """(Σu, Σv) along AXIS. COMPILED: one reduction of both (one barrier round instead of two). The interpreter
    runs custom combine functions element by element in Python, so it gets plain sums."""
    if COMPILED:
        su, sv = tl.reduce((u, v), AXIS, _add2)
    else:
        su = tl.sum(u, axis=AXIS)
        sv = tl.sum(v, axis=AXIS)
    return su, sv


@triton.jit
def _min_max_of(u, v, AXIS: tl.constexpr, COMPILED: tl.constexpr):
    """(min u, max v) along AXIS, fused as in `_sums`."""
    if COMPILED:
        lo, hi = tl.reduce((u, v), AXIS, _min_max)
    else:
        lo = tl.min(u, axis=AXIS)
        hi = tl.max(v, axis=AXIS)
    return lo, hi


# log of the reference's std clamp bounds: clamping a std and clamping its log are the same thing.
LOG_STD_MIN = tl.constexpr(math.log(constants.STD_MIN))
LOG_STD_MAX = tl.constexpr(math.log(constants.STD_MAX))
HALF_LN2 = tl.constexpr(0.5 * math.log(2.0))


@triton.jit
def _clamp_log_std(v):
    return tl.minimum(tl.maximum(v, LOG_STD_MIN), LOG_STD_MAX)


@triton.jit
def _clamp_log(v):
    return tl.minimum(tl.maximum(v, LOG_SCALE_MIN), LOG_SCALE_MAX)


@triton.jit
def _log2(x, COMPILED: tl.constexpr):
    """log2 by the hardware's approximation (MUFU.LG2, relative error < 2^-22): tl.log2 compiles to a
    polynomial of a dozen instructions, which the replicated per-row/column vectors pay many times over."""
    if COMPILED:
        y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _log_std(s1, s2, N: tl.constexpr, COMPILED: tl.constexpr):
    """Unclamped log of the unbiased std, from Σd and Σd² of N values d = y − shift (log std = ½ log var)."""
    var = (s2 - s1 * s1 * (1.0 / N)) * (1.0 / (N - 1))
    return _log2(tl.maximum(var, 0.0), COMPILED) * HALF_LN2


@triton.jit
def _log_ratio(log_std, COMPILED: tl.constexpr, ok, PADDED: tl.constexpr):
    """max(std)/min(std) from log stds; PADDED: only the entries where ok count (padded channels do not)."""
    if not PADDED:
        lo, hi = _min_max_of(log_std, log_std, 0, COMPILED)
    else:
        lo, hi = _min_max_of(tl.where(ok, log_std, float("inf")), tl.where(ok, log_std, float("-inf")), 0, COMPILED)
    return tl.exp(hi - lo)


@triton.jit
def _pad_zero(x, row_ok, col_ok, PAD_R: tl.constexpr, PAD_C: tl.constexpr):
    """x [RP, CP] with its padded rows (PAD_R) and columns (PAD_C) set to 0 (a no-op without padding)."""
    if PAD_R:
        x = tl.where(row_ok[:, None], x, 0.0)
    if PAD_C:
        x = tl.where(col_ok[None, :], x, 0.0)
    return x


@triton.jit
def _pad_fill(x, col_ok, fill, PAD_C: tl.constexpr):
    """x [RP, CP] with its padded columns set to fill (±inf: left out of a min or a max over columns)."""
    if PAD_C:
        x = tl.where(col_ok[None, :], x, fill)
    return x


# --- normalize, round, pack, store ------------------------------------------------------------------
@triton.jit
def _range_cost(x, AXIS: tl.constexpr, COMPILED: tl.constexpr, w=None):
    """Σ of the squared ranges of x along AXIS (`reference.k_range_cost` of a tile or a chunk of its channels),
    each weighted by w (one weight per range; None: unweighted).

    NaN when x holds a NaN or an Inf, as in the reference (compiled max/min would silently drop NaNs)."""
    if COMPILED:
        lo, hi = tl.reduce((x, x), AXIS, _min_max_nan)
    else:
        lo = tl.min(x, axis=AXIS)
        hi = tl.max(x, axis=AXIS)
    if w is None:
        cost = tl.sum((hi - lo) * (hi - lo), axis=0)
    else:
        cost = tl.sum((hi - lo) * (hi - lo) * w, axis=0)
    return cost


@triton.jit
def _quantize_store(x, words_ptr, scales_ptr, col0_sign, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                    ITERS: tl.constexpr, CODES_TRANSPOSED: tl.constexpr, COMPILED: tl.constexpr,
                    ROW_SCALE: tl.constexpr, ROW_ZERO: tl.constexpr, COL_SCALE: tl.constexpr):
    """Normalize and round matrix x [R, C] (float32); write planar code words and row/col scales (at word offsets
    ROW_SCALE, ROW_ZERO, COL_SCALE from the record's scales_ptr).

    x is held [padded_dim(R), padded_dim(C)] (head_dim 96 runs 128 wide) with zeros in the padding: every sum over
    rows or columns divides by the real R or C, padded rows/columns are masked out of deviations, std ratios and
    ranges, and only the R x C codes and their scales are stored.

    col0_sign (±1.0) multiplies col_scale[0]: −1.0 sets the K-frame flag of an unrotated K (see format.py).

    Stds are kept as clamped logs (ls_*): the balancing works in the log domain, and max/min ratios of
    stds are exp(max − min) of their logs.
    """
    RP: tl.constexpr = padded_dim(R)
    CP: tl.constexpr = padded_dim(C)
    PAD_R: tl.constexpr = RP != R
    PAD_C: tl.constexpr = CP != C
    row_ok = tl.arange(0, RP) < R
    col_ok = tl.arange(0, CP) < C
    # The untouched state, with exact two-pass moments.
    sum_r = tl.sum(x, axis=1)
    mean_r = sum_r * (1.0 / C)
    mean_c = tl.sum(x, axis=0) * (1.0 / R)
    dev_r = _pad_zero(x - mean_r[:, None], row_ok, col_ok, False, PAD_C)
    dev_c = _pad_zero(x - mean_c[None, :], row_ok, col_ok, PAD_R, False)
    ls_r = _clamp_log_std(_log_std(0.0, tl.sum(dev_r * dev_r, axis=1), C, COMPILED))
    ls_c = _clamp_log_std(_log_std(0.0, tl.sum(dev_c * dev_c, axis=0), R, COMPILED))
    best = _log_ratio(ls_c, COMPILED, col_ok, PAD_C) + _log_ratio(ls_r, COMPILED, row_ok, PAD_R)

    log_r = tl.zeros([RP], dtype=tl.float32)
    best_r = log_r
    best_c = tl.zeros([CP], dtype=tl.float32)
    # Each iteration first moves log_c by the log std of the current state's columns; that update is done at
    # the end of the previous iteration, so the column stds need not stay live across iterations.
    log_c = _clamp_log(ls_c)
    for _ in range(ITERS):
        # Rows of the state (log_r, log_c): log std = log std_c(x · b) − log_r.
        d = _pad_zero(x * tl.exp(-log_c)[None, :] - mean_r[:, None], row_ok, col_ok, False, PAD_C)
        s1, s2 = _sums(d, d * d, 1, COMPILED)
        mean_r = mean_r + s1 * (1.0 / C)
        lt = _log_std(s1, s2, C, COMPILED)
        log_r = _clamp_log(log_r + _clamp_log_std(lt - log_r))
        # The new state: its row stds by rescaling, its column stds std_r(x · a) · b from one pass.
        ls_r = _clamp_log_std(lt - log_r)
        d = _pad_zero(x * tl.exp(-log_r)[:, None] - mean_c[None, :], row_ok, col_ok, PAD_R, False)
        s1, s2 = _sums(d, d * d, 0, COMPILED)
        mean_c = mean_c + s1 * (1.0 / R)
        ls_c = _clamp_log_std(_log_std(s1, s2, R, COMPILED) - log_c)
        imb = _log_ratio(ls_c, COMPILED, col_ok, PAD_C) + _log_ratio(ls_r, COMPILED, row_ok, PAD_R)
        better = imb <= best
        best_r = tl.where(better, log_r, best_r)
        best_c = tl.where(better, log_c, best_c)
        best = tl.where(better, imb, best)
        log_c = _clamp_log(log_c + ls_c)

    # Guard: fall back to the untouched tile when balancing predicts a larger RTN error (see reference). The
    # same pass takes the row energies and ranges; they are not kept live through the loop.
    a = tl.exp(-best_r)
    b = tl.exp(-best_c)
    bal = x * a[:, None] * b[None, :]
    # Padded columns: +inf for the minima, -inf for the maxima (padded rows are all zeros and weigh 0 below).
    x_min, x_max = _pad_fill(x, col_ok, float("inf"), PAD_C), _pad_fill(x, col_ok, float("-inf"), PAD_C)
    bal_min, bal_max = _pad_fill(bal, col_ok, float("inf"), PAD_C), _pad_fill(bal, col_ok, float("-inf"), PAD_C)
    if COMPILED:
        energy, x_lo, x_hi, bal_lo, bal_hi = tl.reduce((x * x, x_min, x_max, bal_min, bal_max), 1, _guard_pass)
    else:
        energy = tl.sum(x * x, axis=1)
        x_lo, x_hi = _min_max_of(x_min, x_max, 1, False)
        bal_lo, bal_hi = _min_max_of(bal_min, bal_max, 1, False)
    # The NaN poison of a row: NaN when it holds a NaN (its energy is NaN; compiled max/min would silently drop it) or
    # an Inf (its range reaches one), else 0. A finite row whose energy overflows is not poisoned.
    poison_r = tl.where((energy != energy) | (x_hi == float("inf")) | (x_lo == float("-inf")), float("nan"), 0.0)
    inv_energy = 1.0 / (energy + 1e-30)
    spread = (bal_hi - bal_lo) * tl.exp(best_r)
    col_energy = tl.exp(2 * best_c)
    if PAD_C:
        col_energy = tl.where(col_ok, col_energy, 0.0)
    err_best = tl.sum(spread * spread * inv_energy, axis=0) * tl.sum(col_energy, axis=0)
    err_zero = tl.sum((x_hi - x_lo) * (x_hi - x_lo) * inv_energy, axis=0) * C
    worse = err_best > GUARD_FACTOR * err_zero
    best_r = tl.where(worse, 0.0, best_r)
    best_c = tl.where(worse, 0.0, best_c)
    a = tl.where(worse, 1.0, a)
    b = tl.where(worse, 1.0, b)
    lo = tl.where(worse, x_lo, bal_lo)
    hi = tl.where(worse, x_hi, bal_hi)

    step = tl.maximum((hi - lo) / (2**BITS - 1), RTN_MIN_SCALE)
    bal = x * a[:, None] * b[None, :]
    # Round half up, then clamp: floor(u + 0.5) as a truncating conversion (one conversion-pipe operation per code, not
    # a floor and a conversion), which equals the floor wherever u + 0.5 >= 0 and clamps to 0 like it below; a NaN
    # converts to 0, as the float clamp made it before.
    q = (_row_quotient(bal - lo[:, None], step, COMPILED) + 0.5).to(tl.int32)
    q = tl.minimum(tl.maximum(q, 0), 2**BITS - 1).to(tl.int8)
    if CODES_TRANSPOSED:
        _store_words(tl.trans(q), words_ptr, C, R, BITS)
    else:
        _store_words(q, words_ptr, R, C, BITS)

    r = tl.arange(0, RP)
    s_row = tl.exp(best_r) + tl.sum(poison_r, axis=0)
    ty: tl.constexpr = scales_ptr.dtype.element_ty
    _store_vector(scales_ptr + ROW_SCALE + r, _round_to(s_row * step, ty), row_ok, PAD_R)
    _store_vector(scales_ptr + ROW_ZERO + r, _round_to(s_row * lo, ty), row_ok, PAD_R)
    c = tl.arange(0, CP)
    col = tl.exp(best_c) * tl.where(c == 0, col0_sign, 1.0)
    _store_vector(scales_ptr + COL_SCALE + c, _round_to(col, ty), col_ok, PAD_C)


@triton.jit
def _store_vector(ptr, x, ok, PADDED: tl.constexpr):
    if PADDED:
        tl.store(ptr, x, mask=ok)
    else:
        tl.store(ptr, x)


@triton.jit
def _row_quotient(num, step, COMPILED: tl.constexpr):
    """num / step[:, None] rounded to nearest (the reference's float32 division), for step >= RTN_MIN_SCALE per row.

    Compiled: Markstein's correction with each row's correctly rounded reciprocal y = RN(1/step): q0 = RN(num·y), the
    remainder num − q0·step (exact in an FMA) and RN(q0 + remainder·y) = RN(num/step), three operations per element.
    tl.div_rn per element cost ~10 (a reciprocal, five FMAs and a range check whose slow-path branch also kept ptxas
    from overlapping the divisions). Where step >= 2^126 (2-bit rows spanning more
    than 2.5e38) y is subnormal, with 22-23 significant bits: the quotient may then differ from the division's in its
    last bit, which moves a code by one only where the quotient is that close to a half-integer. The interpreter keeps
    tl.div_rn (its FMA may round twice)."""
    if COMPILED:
        y = tl.div_rn(tl.full(step.shape, 1.0, tl.float32), step)
        q0 = num * y[:, None]
        quo = tl.fma(tl.fma(-q0, step[:, None], num), y[:, None], q0)
    else:
        quo = tl.div_rn(num, step[:, None])
    return quo


@triton.jit
def _round_to(x, ty: tl.constexpr):
    """float32 → ty with round-to-nearest-even, also where a backend's bfloat16 cast truncates."""
    if ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN keeps its bits: the GPU's canonical NaN 0x7FFFFFFF would carry into the sign and round to −0.0,
        # silently dropping a NaN/Inf tile's poison (integer test: float compares may be folded).
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, bits, rounded)
        x = rounded.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _store_words(q, words_ptr, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """Pack codes q [padded_dim(ROWS), N] planar: word j of a row holds columns j, j+N/4, j+N/2, j+3N/4. Rows past
    ROWS (padding) are not stored."""
    RP: tl.constexpr = padded_dim(ROWS)
    planes = tl.reshape(q, [RP, 4, N // 4]).to(tl.int32)
    shifts = (tl.arange(0, 4) * BITS)[None, :, None]
    words = tl.sum(planes << shifts, axis=1)
    rows = tl.arange(0, RP)[:, None]
    offs = rows * (N // 4) + tl.arange(0, N // 4)[None, :]
    if RP != ROWS:
        tl.store(words_ptr + offs, words.to(words_ptr.dtype.element_ty), mask=rows < ROWS)
    else:
        tl.store(words_ptr + offs, words.to(words_ptr.dtype.element_ty))


# --- rotation --------------------------------------------------------------------------------------
@triton.jit
def _rotate(src_ptr, stride_t, signs_ptr, G: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr,
            TRANSPOSED: tl.constexpr, INTERPRETED: tl.constexpr, RANGE_COST: tl.constexpr, w_ptr=None):
    """(rotated tile, float32: [G, D] (x·H), or [D, G] ((x·H)ᵀ = H·xᵀ) when TRANSPOSED; raw cost).

    raw cost: with RANGE_COST, `reference.k_range_cost` of the unrotated tile, taken from the chunks the dot
    loads anyway (NaN when the tile holds a NaN or an Inf), its channels weighted by w_ptr[:D] if given (TRANSPOSED
    only: `reference.choose_k_rotation`'s channel weights); 0.0 otherwise.

    head_dim 96: the tile is held 128 wide (`padded_dim`); padded channels load as 0 (range 0: no cost) and the
    zero-padded ±1 operand (hadamard_signs) leaves them 0 after the rotation.

    The ±1 matrix (bfloat16) and 16-bit inputs multiply exactly on tensor cores, with float32 sums: the float32
    reference up to summation order. A float32 input is split exactly into three bfloat16 parts (8 significant
    bits each) that accumulate into the same sums. INTERPRETED: the interpreter's bfloat16 dot is wrong, so the
    dot runs in float32 there (the products are exact too).
    """
    # Sums over the D input channels in chunks of KC: shared memory holds one chunk of x and H at a time.
    KC: tl.constexpr = 64
    DP: tl.constexpr = padded_dim(D)
    rot = tl.zeros([DP, G] if TRANSPOSED else [G, DP], dtype=tl.float32)
    raw_cost = 0.0
    for k0 in tl.range(0, DP, KC):
        kc = k0 + tl.arange(0, KC)
        if TRANSPOSED:
            signs = tl.load(signs_ptr + tl.arange(0, DP)[:, None] * DP + kc[None, :])  # H[:, kc]
            x_ptrs = src_ptr + kc[:, None] + tl.arange(0, G)[None, :] * stride_t  # xᵀ[kc, :]
            kc_ok = kc[:, None] < D
        else:
            signs = tl.load(signs_ptr + kc[:, None] * DP + tl.arange(0, DP)[None, :])  # H[kc, :]
            x_ptrs = src_ptr + tl.arange(0, G)[:, None] * stride_t + kc[None, :]  # x[:, kc]
            kc_ok = kc[None, :] < D
        if DP != D:
            x = tl.load(x_ptrs, mask=kc_ok, other=0.0)
        else:
            x = tl.load(x_ptrs)
        if RANGE_COST:
            # The chunk's channels run along axis 0 of xᵀ[kc, :] (TRANSPOSED) or axis 1 of x[:, kc].
            if w_ptr is None:
                raw_cost += _range_cost(x.to(tl.float32), 1 if TRANSPOSED else 0, not INTERPRETED)
            elif DP != D:
                raw_cost += _range_cost(x.to(tl.float32), 1 if TRANSPOSED else 0, not INTERPRETED,
                                        tl.load(w_ptr + kc, mask=kc < D, other=0.0))
            else:
                raw_cost += _range_cost(x.to(tl.float32), 1 if TRANSPOSED else 0, not INTERPRETED,
                                        tl.load(w_ptr + kc))
        if INTERPRETED:
            rot = _signs_dot(x.to(tl.float32), signs.to(tl.float32), rot, TRANSPOSED)
        elif x.dtype == tl.float32:
            hi = x.to(tl.bfloat16)
            rest = x - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            rot = _signs_dot(hi, signs, rot, TRANSPOSED)
            rot = _signs_dot(mid, signs, rot, TRANSPOSED)
            rot = _signs_dot((rest - mid.to(tl.float32)).to(tl.bfloat16), signs, rot, TRANSPOSED)
        else:
            rot = _signs_dot(x, signs, rot, TRANSPOSED)
    # The dot leaves the tile in the tensor cores' layout, where each thread holds 2 rows x 16-32 columns:
    # every column vector of the normalization would then cost 16-32 registers and instructions per thread.
    # An identity gather is the one way to move it to a blocked layout (4-8 rows x 4-8 columns per thread).
    n: tl.constexpr = G if TRANSPOSED else DP
    rot = tl.gather(rot, tl.broadcast_to(tl.arange(0, n)[None, :], rot.shape), axis=1)
    return rot * SCALE, raw_cost


@triton.jit
def _signs_dot(x, signs, acc, TRANSPOSED: tl.constexpr):
    if TRANSPOSED:
        out = tl.dot(signs, x, acc, out_dtype=tl.float32)
    else:
        out = tl.dot(x, signs, acc, out_dtype=tl.float32)
    return out


# num_blocks only bounds-checks block ids: one build for every cache size (no specialization on 1 or multiples of 16).
@triton.jit(do_not_specialize=["num_blocks"])
def _quantize_tiles_kernel(
    k_src, v_src, stride_t, stride_h, signs,
    tile_starts, block_ids,
    k_words, v_words, scales, kw_stride_b, kw_stride_h, vw_stride_b, vw_stride_h, scales_stride_b, scales_stride_h,
    k_weights, num_blocks,
    G: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, ITERS: tl.constexpr,
    SCALE: tl.constexpr, INTERPRETED: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    DP: tl.constexpr = padded_dim(D)  # head_dim 96 runs 128 wide (see `_quantize_store`)
    block = tl.load(block_ids + n).to(tl.int64)
    if (block < 0) | (block >= num_blocks):
        return  # an out-of-range block id (device data, not checked on the host) writes nothing, never out of bounds
    start = tl.load(tile_starts + n).to(tl.int64)
    offset = start * stride_t + h * stride_h
    scales_base = scales + block * scales_stride_b + h * scales_stride_h
    # K and V of a tile are independent: separate programs double the parallelism of this latency-bound
    # kernel (its tile-wide reductions each wait on a barrier).
    if tl.program_id(2) == 0:
        # The K frame (`reference.choose_k_rotation`): rotated iff that lowers the per-channel range cost (with
        # channel weights w: Σ w·range² unrotated against mean(w)·Σ range² rotated). A NaN/Inf tile has a NaN raw
        # cost, so it stays unrotated as in the reference (and poisons its scales).
        if HAS_WEIGHTS:
            w_ptr = k_weights + (n * tl.num_programs(1) + h) * D
            k_rot, raw_cost = _rotate(k_src + offset, stride_t, signs, G, D, SCALE, True, INTERPRETED, True, w_ptr)
            dw = tl.arange(0, DP)
            w_mean = tl.sum(tl.load(w_ptr + dw, mask=dw < D, other=0.0) if DP != D else tl.load(w_ptr + dw),
                            axis=0) / D
            rotated = w_mean * _range_cost(k_rot, 1, not INTERPRETED) < raw_cost
        else:
            k_rot, raw_cost = _rotate(k_src + offset, stride_t, signs, G, D, SCALE, True, INTERPRETED, True)
            rotated = _range_cost(k_rot, 1, not INTERPRETED) < raw_cost
        unrotated = rotated == 0
        # The unrotated frame reloads the tile in the rotated tile's layout (no load when rotated): a second
        # copy of the tile is live only here, before the normalization's working set.
        ch = tl.arange(0, DP)[:, None]
        tok = tl.arange(0, G)[None, :]
        raw = tl.load(k_src + offset + ch + tok * stride_t, mask=unrotated & ((ch < D) if DP != D else (ch >= 0)),
                      other=0.0)
        k_tile = tl.where(rotated, k_rot, raw.to(tl.float32))
        _quantize_store(k_tile, k_words + block * kw_stride_b + h * kw_stride_h, scales_base,
                        tl.where(rotated, 1.0, -1.0), D, G, KBITS, ITERS, False, not INTERPRETED,
                        scale_offset("k_row_scale", D, G), scale_offset("k_row_zero", D, G),
                        scale_offset("k_col_scale", D, G))
    else:
        v_rot, _ = _rotate(v_src + offset, stride_t, signs, G, D, SCALE, False, INTERPRETED, False)
        # Layout anchor: a never-taken select with a fully masked load of the tile (no memory traffic) moves the
        # rotated tile into the load's register layout, as the K frame's select does for K. Left in the gather's
        # layout (32 rows x 4 columns), the normalization loop needed twice the shuffles and spilled. The load is
        # [G, 2, D/2], so that its layout puts 4 lanes along the rows and 8 along the columns: a row reduction then
        # crosses 8 lanes, not 16. K keeps its layout: the same change there spilled more and lengthened its loop.
        HALF: tl.constexpr = DP // 2
        v_tok = tl.arange(0, G)[:, None, None]
        v_half = tl.arange(0, 2)[None, :, None]
        v_ch = tl.arange(0, HALF)[None, None, :]
        anchor = tl.load(v_src + offset + v_tok * stride_t + v_half * HALF + v_ch, mask=(n < 0) & (v_ch >= 0),
                         other=0.0)
        v_rot = tl.where(n < 0, tl.reshape(anchor, (G, DP)).to(tl.float32), v_rot)
        _quantize_store(v_rot, v_words + block * vw_stride_b + h * vw_stride_h, scales_base,
                        1.0, G, D, VBITS, ITERS, True, not INTERPRETED, scale_offset("v_row_scale", D, G),
                        scale_offset("v_row_zero", D, G), scale_offset("v_col_scale", D, G))


def quantize_into_cache(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    tile_starts: torch.Tensor,
    block_ids: torch.Tensor,
    cache: torch.Tensor,
    fmt: KVarNFormat,
    k_weights: torch.Tensor | None = None,
    launch_overrides: dict | None = None,
) -> None:
    """Quantize tiles of G tokens from k_src/v_src [T, H, D] into cache blocks, all in one launch.

    Tile i holds tokens tile_starts[i] .. tile_starts[i] + G - 1 of the source and is written to
    cache[block_ids[i]] (all KV heads). The caller guarantees the tokens exist (no host sync here). A block id outside
    [0, cache.shape[0]) is not checked on the host (that would sync): its tile is skipped, nothing is written.
    k_weights (optional, float32 [N, H, D], contiguous): tile i's channel weights of the K-frame choice
    (`codec.choose_k_rotation`). launch_overrides: launch options replacing `launch_options`' choice (benchmarks).
    """
    _check_sources(k_src, v_src, tile_starts, block_ids, cache, fmt)
    check_k_weights(k_weights, (tile_starts.numel(), k_src.shape[1], fmt.head_dim))
    if k_weights is not None and (not k_weights.is_contiguous() or k_weights.device != k_src.device):
        raise ValueError(f"k_weights must be contiguous and on {k_src.device}")
    n = tile_starts.numel()
    if n == 0:
        return
    k_words, v_words, scales = fmt.word_views(cache)
    opts = launch_options(fmt, k_src.dtype, interpreted=not k_src.is_cuda, overrides=launch_overrides)
    signs = hadamard_signs(fmt.head_dim, torch.float16 if k_src.dtype == torch.float16 else torch.bfloat16,
                           k_src.device)
    _quantize_tiles_kernel[(n, k_src.shape[1], 2)](
        k_src, v_src, k_src.stride(0), k_src.stride(1), signs,
        tile_starts, block_ids,
        k_words, v_words, scales, k_words.stride(0), k_words.stride(1), v_words.stride(0), v_words.stride(1),
        scales.stride(0), scales.stride(1), k_weights if k_weights is not None else scales, cache.shape[0],
        HAS_WEIGHTS=k_weights is not None,
        **opts["constexprs"], **{k: v for k, v in opts.items() if k != "constexprs"},
    )


def launch_options(fmt: KVarNFormat, dtype: torch.dtype, interpreted: bool = False,
                   overrides: dict | None = None) -> dict:
    """Constexprs and launch options of `_quantize_tiles_kernel` (compile_stats_quantize.py reads them too);
    overrides (e.g. {"num_warps": 8}) replace launch options: benchmarks sweep them through `quantize_into_cache`."""
    # Few warps per program: this kernel waits on its tile-wide reductions (each a barrier across the program's
    # warps), not on memory, and fewer warps make cheaper reductions and let two programs share an SM.
    num_warps = 4 if fmt.head_dim * fmt.group <= 128 * 128 else 8
    constexprs = dict(G=fmt.group, D=fmt.head_dim, KBITS=fmt.k_bits, VBITS=fmt.v_bits, ITERS=constants.NORMALIZE_ITERS,
                      SCALE=1.0 / math.sqrt(fmt.head_dim),
                      INTERPRETED=interpreted)
    # num_stages=1: no software pipelining of the rotation's chunk loads (it would multiply their shared memory).
    return {"constexprs": constexprs, "num_warps": num_warps, "num_stages": 1, **(overrides or {})}


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
