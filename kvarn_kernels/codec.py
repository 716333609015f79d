"""Plain-PyTorch codec of KVarN records: the quantizer's definition (variance normalization, round-to-nearest,
planar packing, the per-tile K-frame rule) and its inverse. Readable float32 math on whatever device the inputs live
on; the Triton quantize kernel must match it, the CPU backend (`dense`) runs it. See `format.py` for the layout.
"""

from __future__ import annotations

import torch

from .constants import GUARD_FACTOR, LOG_SCALE_MAX, LOG_SCALE_MIN, NORMALIZE_ITERS, RTN_MIN_SCALE, STD_MAX, STD_MIN
from .format import SCALE_SECTIONS, KVarNFormat, k_frame_rotated, mark_k_frame, scale_section_sizes
from .hadamard import rotate


def _std(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.std(dim=dim, unbiased=True).clamp(STD_MIN, STD_MAX)


def _imbalance(col_std: torch.Tensor, row_std: torch.Tensor) -> torch.Tensor:
    return col_std.amax(-1) / col_std.amin(-1) + row_std.amax(-1) / row_std.amin(-1)


def normalize_scales(tiles: torch.Tensor, iters: int = NORMALIZE_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn-like variance balancing of tiles [N, R, C].

    Returns (log_row [N, R], log_col [N, C]) of the lowest-imbalance state seen, the untouched tile
    included; ties go to the later state. The balanced tile is tiles / exp(log_row)[:, None] / exp(log_col).

    Guard (this project's addition): when the predicted per-row RTN error of that state exceeds the
    untouched tile's, the untouched tile is used. Balancing a column that holds one huge outlier shrinks
    the column's other entries below a quantization step, and scaling back would amplify their error.
    """
    x = tiles.float()
    n, r, c = x.shape
    log_row = x.new_zeros(n, r)
    log_col = x.new_zeros(n, c)
    best_row, best_col = log_row.clone(), log_col.clone()
    best = _imbalance(_std(x, 1), _std(x, 2))
    for _ in range(iters):
        log_col = (log_col + _std(_balanced(x, log_row, log_col), 1).log()).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        log_row = (log_row + _std(_balanced(x, log_row, log_col), 2).log()).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        cur = _balanced(x, log_row, log_col)
        imb = _imbalance(_std(cur, 1), _std(cur, 2))
        better = imb <= best
        best = torch.where(better, imb, best)
        best_row = torch.where(better[:, None], log_row, best_row)
        best_col = torch.where(better[:, None], log_col, best_col)
    zero_row, zero_col = torch.zeros_like(best_row), torch.zeros_like(best_col)
    worse = predicted_rtn_error(x, best_row, best_col) > GUARD_FACTOR * predicted_rtn_error(x, zero_row, zero_col)
    return torch.where(worse[:, None], zero_row, best_row), torch.where(worse[:, None], zero_col, best_col)


def predicted_rtn_error(x: torch.Tensor, log_row: torch.Tensor, log_col: torch.Tensor) -> torch.Tensor:
    """Predicted per-row RTN error of a balanced state, mapped back: Σ_r (range_r s_r)² Σ_c s_c² / |x_r|².

    Each row's error counts relative to the row's own energy, so one outlier row cannot hide the damage
    done to all the others (up to a constant factor shared by every state).
    """
    bal = _balanced(x, log_row, log_col)
    spread = (bal.amax(-1) - bal.amin(-1)) * log_row.exp()
    energy = (x * x).sum(-1) + 1e-30
    return (spread * spread / energy).sum(-1) * (2 * log_col).exp().sum(-1)


def _balanced(x: torch.Tensor, log_row: torch.Tensor, log_col: torch.Tensor) -> torch.Tensor:
    return x * torch.exp(-log_row)[:, :, None] * torch.exp(-log_col)[:, None, :]


def quantize_matrices(
    x: torch.Tensor, bits: int, iters: int = NORMALIZE_ITERS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize, round and absorb scales for matrices x [N, R, C] (rows quantized).

    Returns (codes uint8 [N, R, C], row_scale [N, R], row_zero [N, R], col_scale [N, C]) in float32 with
    x ≈ (codes * row_scale[:, :, None] + row_zero[:, :, None]) * col_scale[:, None, :].
    """
    log_row, log_col = normalize_scales(x, iters)
    bal = _balanced(x.float(), log_row, log_col)
    lo = bal.amin(-1)
    hi = bal.amax(-1)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(RTN_MIN_SCALE)
    # Round half up (not half to even): the same rule the Triton kernels use.
    codes = torch.floor((bal - lo[..., None]) / step[..., None] + 0.5).clamp(0, 2**bits - 1)
    s_row = log_row.exp()
    return codes.to(torch.uint8), s_row * step, s_row * lo, log_col.exp()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [..., N] (values < 2**bits) planar into uint8 [..., N*bits/8] (see format.py).

    Word j (4*bits bits, little-endian) holds the codes at j, j + N/4, j + N/2, j + 3N/4 at bits 0, b, 2b, 3b.
    """
    n = codes.shape[-1]
    if n % 4:
        raise ValueError(f"last dim {n} is not a multiple of 4")
    planes = codes.to(torch.int32).reshape(*codes.shape[:-1], 4, n // 4)
    shifts = (torch.arange(4, device=codes.device, dtype=torch.int32) * bits)[:, None]
    words = (planes << shifts).sum(-2)  # [..., N/4]
    if bits == 2:
        return words.to(torch.uint8)
    return torch.stack([words & 0xFF, words >> 8], dim=-1).reshape(*codes.shape[:-1], n // 2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., N*bits/8] → uint8 codes [..., N]."""
    w = packed.to(torch.int32)
    if bits == 4:
        pairs = w.reshape(*packed.shape[:-1], -1, 2)
        w = pairs[..., 0] | (pairs[..., 1] << 8)
    shifts = (torch.arange(4, device=packed.device, dtype=torch.int32) * bits)[:, None]
    planes = (w[..., None, :] >> shifts) & (2**bits - 1)  # [..., 4, N/4]
    return planes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def k_range_cost(k_tiles: torch.Tensor, channel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over channels of the squared per-channel range over the tile's tokens (each weighted by channel_weights
    [..., D] if given): tiles [..., G, D] → [...].

    Proportional to the mean squared error of per-channel min-max RTN of the tile.
    """
    x = k_tiles.float()
    ranges = (x.amax(-2) - x.amin(-2)).square()
    return (ranges if channel_weights is None else ranges * channel_weights.float()).sum(-1)


def k_frame_costs(
    k_tiles: torch.Tensor, k_rot: torch.Tensor | None = None, channel_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated, unrotated) predicted RTN score-error costs of K tiles [..., G, D] (original frame) → [...] each.

    Unweighted: k_range_cost(k·H) and k_range_cost(k). With channel_weights [..., D] (the expected squared query per
    channel, `sink_query_weights`; broadcast over the tile's leading dims): Σ_d w_d range_d² unrotated and
    mean(w)·Σ_d range(kH)_d² rotated (a rotated tile's errors land evenly on all channels).
    """
    rotated = k_range_cost(rotate(k_tiles) if k_rot is None else k_rot)
    if channel_weights is not None:
        rotated = channel_weights.float().mean(-1) * rotated
    return rotated, k_range_cost(k_tiles, channel_weights)


def choose_k_rotation(
    k_tiles: torch.Tensor, k_rot: torch.Tensor | None = None, channel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Whether each K tile [..., G, D] (original frame) is stored rotated → bool [...].

    Rotate iff it lowers the per-channel range cost (`k_frame_costs`; channel_weights optional). Loud, bounded
    channels (RoPE'd key biases: sinusoids over positions) are cheapest in their own channel, and rotating them floods
    the quiet channels the queries use; heavy-tailed or spread-out energy is cheaper rotated. Ties (constant or zero
    tiles) stay unrotated. Calibration-free: it looks only at the tile (and, weighted, at the row's sink queries).
    See reports/rotation_choice.
    """
    rotated, unrotated = k_frame_costs(k_tiles, k_rot, channel_weights)
    return rotated < unrotated


def sink_query_weights(q_sink: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Channel weights of `choose_k_rotation` from the sink's queries q_sink [Hq, S, D] (post-RoPE): the mean squared
    query per channel, pooled over the query heads that share a KV head (head h*rep + r uses KV head h) → [num_kv_heads,
    D] float32."""
    hq, s, d = q_sink.shape
    return q_sink.float().reshape(num_kv_heads, hq // num_kv_heads * s, d).square().mean(1)


def quantize_tile_records(
    k: torch.Tensor, v: torch.Tensor, fmt: KVarNFormat, rotate_k: bool | None = None,
    k_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize tiles k, v [N, H, G, D] (original frame) into records uint8 [N, H, record_bytes].

    rotate_k: None chooses K's frame per record (`choose_k_rotation`, with channel weights k_weights [N, H, D] if
    given); True/False force it (ablations, and the always-rotated K of format version 1).
    """
    _check_tiles(k, v, fmt)
    n, h, g, d = k.shape
    check_k_weights(k_weights, (n, h, d))
    k_rot = rotate(k)
    if rotate_k is None:
        k_rotated = choose_k_rotation(k, k_rot, k_weights)  # [N, H]
    else:
        k_rotated = torch.full((n, h), rotate_k, dtype=torch.bool, device=k.device)
    k_frame = torch.where(k_rotated[..., None, None], k_rot, k.float())
    k_mat = k_frame.reshape(n * h, g, d).transpose(1, 2)  # K matrix: rows = channels
    v_rot = rotate(v).reshape(n * h, g, d)  # V matrix: rows = tokens
    kc, krs, krz, kcs = quantize_matrices(k_mat, fmt.k_bits)
    vc, vrs, vrz, vcs = quantize_matrices(v_rot, fmt.v_bits)
    # Both code matrices are stored channel-major: V's [G, D] codes are transposed first.
    codes = torch.cat([pack(kc, fmt.k_bits).flatten(1), pack(vc.transpose(1, 2), fmt.v_bits).flatten(1)], dim=1)
    sections = {"k_row_scale": krs, "k_row_zero": krz, "k_col_scale": kcs, "v_row_scale": vrs, "v_row_zero": vrz,
                "v_col_scale": vcs}
    scales = torch.cat([sections[name] for name, _ in SCALE_SECTIONS], dim=1).to(fmt.scale_dtype)
    flag = fmt.layout()["k_frame_flag"]
    scales[:, flag] = mark_k_frame(scales[:, flag], k_rotated.flatten())
    records = torch.cat([codes, scales.view(torch.uint8)], dim=1)
    return records.reshape(n, h, fmt.record_bytes)


def dequantize_records(
    records: torch.Tensor, fmt: KVarNFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Records uint8 [N, H, record_bytes] → (k, v_rot, k_rotated): k float32 [N, H, G, D] in its stored frame
    (rotated where k_rotated [N, H] is True, original otherwise), v_rot float32 [N, H, G, D] rotated."""
    n, h, _ = records.shape
    d, g = fmt.head_dim, fmt.group
    flat = records.reshape(n * h, -1)
    kc = unpack(flat[:, : fmt.k_code_bytes].reshape(-1, d, g * fmt.k_bits // 8), fmt.k_bits).float()
    vc = unpack(flat[:, fmt.k_code_bytes : fmt.code_bytes].reshape(-1, d, g * fmt.v_bits // 8), fmt.v_bits)
    vc = vc.transpose(1, 2)
    s = flat[:, fmt.code_bytes :].contiguous().view(fmt.scale_dtype).float()
    k_rotated = k_frame_rotated(s[:, fmt.layout()["k_frame_flag"]])
    sections = dict(zip((name for name, _ in SCALE_SECTIONS), s.split(scale_section_sizes(d, g), dim=1), strict=True))
    krs, krz, kcs, vrs, vrz, vcs = (sections[name] for name in ("k_row_scale", "k_row_zero", "k_col_scale",
                                                                  "v_row_scale", "v_row_zero", "v_col_scale"))
    kcs = kcs.abs()
    k_mat = (kc * krs[:, :, None] + krz[:, :, None]) * kcs[:, None, :]
    v_mat = (vc.float() * vrs[:, :, None] + vrz[:, :, None]) * vcs[:, None, :]
    return k_mat.transpose(1, 2).reshape(n, h, g, d), v_mat.reshape(n, h, g, d), k_rotated.reshape(n, h)


def dequantize_tiles(records: torch.Tensor, fmt: KVarNFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Records → (k, v) float32 [N, H, G, D] in the original (un-rotated) frame."""
    k, v_rot, k_rotated = dequantize_records(records, fmt)
    return torch.where(k_rotated[..., None, None], rotate(k), k), rotate(v_rot)


def check_k_weights(k_weights: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if k_weights is not None and (tuple(k_weights.shape) != shape or k_weights.dtype != torch.float32):
        raise ValueError(f"k_weights must be float32 {list(shape)} (tiles, KV heads, head_dim), got "
                         f"{k_weights.dtype} {list(k_weights.shape)}")


def _check_tiles(k: torch.Tensor, v: torch.Tensor, fmt: KVarNFormat) -> None:
    expected = (fmt.group, fmt.head_dim)
    if k.dim() != 4 or tuple(k.shape[2:]) != expected or k.shape != v.shape:
        raise ValueError(
            f"tiles must be [N, H, {fmt.group}, {fmt.head_dim}] with equal K and V shapes, "
            f"got K {tuple(k.shape)} and V {tuple(v.shape)}"
        )

