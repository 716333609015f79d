"""Triton quantize kernel versus the PyTorch reference (interpreter on CPU, compiled on GPU)."""

import pytest
import torch
import triton
import triton.language as tl

from kvarn_kernels import reference as ref
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import _round_to, quantize_into_cache
from kvarn_kernels.reference import synthetic_kv

# Two range costs closer than this (relative) are a near tie: the kernel's rotated tile equals the reference's up
# to float32 summation order (last bits), and its cost sums run in another order too, so the K-frame flag of such
# a tile may legitimately come out either way. Real differences are orders of magnitude larger than this.
NEAR_TIE = 1e-5


def _flags(records, fmt):
    """K-frame flags (True = rotated) of records [N, H, record_bytes]."""
    return ref.dequantize_records(records, fmt)[2]


def _quantize_tiles(k_tiles, v_tiles, fmt, k_weights=None):
    """Kernel records of tiles [N, H, G, D] (laid out as sources [T, H, D], one tile after another)."""
    n, h, g, d = k_tiles.shape
    src_k = k_tiles.transpose(1, 2).reshape(n * g, h, d).contiguous()
    src_v = v_tiles.transpose(1, 2).reshape(n * g, h, d).contiguous()
    starts = torch.arange(n, dtype=torch.int32, device=k_tiles.device) * g
    cache = fmt.allocate(n, h, k_tiles.device)
    quantize_into_cache(src_k, src_v, starts, starts // g, cache, fmt, k_weights)
    return cache


def _loud_channel_tile(g, d, seed=0):
    """A RoPE'd key bias: channels 0..3 carry 50·cos/sin(pos·θ) (two rotating pairs), the rest small noise."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(1000, 1000 + g, dtype=torch.float32)
    k = 0.5 * torch.randn(g, d, generator=gen)
    for pair, theta in enumerate((1.0, 0.3)):
        k[:, 2 * pair] += 50 * torch.cos(pos * theta)
        k[:, 2 * pair + 1] += 50 * torch.sin(pos * theta)
    return k


def _quantize_both(preset, head_dim, dtype, device, n_heads=2, seed=0):
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    g = fmt.group
    k, v = synthetic_kv(3 * g + 5, n_heads, head_dim, dtype, seed=seed, device=device)
    starts = torch.tensor([0, g + 5, 2 * g + 5], dtype=torch.int32, device=device)
    blocks = torch.tensor([3, 0, 1], dtype=torch.int32, device=device)
    expected, actual = fmt.allocate(5, n_heads, device), fmt.allocate(5, n_heads, device)
    ref.quantize_into_cache_ref(k, v, starts, blocks, expected, fmt)
    quantize_into_cache(k, v, starts, blocks, actual, fmt)
    return fmt, k, v, starts, blocks, expected, actual


@pytest.mark.parametrize(
    "preset,head_dim,dtype",
    [
        ("kvarn_k4v2_g64", 64, torch.float16),
        ("kvarn_k4v4_g64", 64, torch.bfloat16),
        ("kvarn_k2v2_g128", 64, torch.float32),
        ("kvarn_k4v2_g128", 128, torch.bfloat16),
        ("kvarn_k4v4_g64", 96, torch.bfloat16),  # head_dim 96: 128 wide in registers, padding masked
        ("kvarn_k2v2_g128", 96, torch.float32),
    ],
)
def test_kernel_matches_reference(preset, head_dim, dtype, device):
    fmt, k, v, starts, blocks, expected, actual = _quantize_both(preset, head_dim, dtype, device)
    offs = starts.long()[:, None] + torch.arange(fmt.group, device=device)
    k_true = k[offs].transpose(1, 2).float()
    v_true = v[offs].transpose(1, 2).float()
    # The K-frame flags agree except on near ties (see NEAR_TIE).
    rec_e, rec_a = expected[blocks.long()], actual[blocks.long()]
    flags_e, flags_a = _flags(rec_e, fmt), _flags(rec_a, fmt)
    assert torch.equal(flags_e, ref.choose_k_rotation(k_true))
    assert 0 < int(flags_e.sum()) < flags_e.numel()  # both frames are exercised
    cost_rot, cost_raw = ref.k_frame_costs(k_true)
    near_tie = (cost_rot - cost_raw).abs() <= NEAR_TIE * cost_raw
    assert torch.equal(flags_e[~near_tie], flags_a[~near_tie])
    # fp32 reductions in another order may flip a rounding boundary: allow ≤ 0.5 % of codes to differ (a record
    # whose near-tie frame came out differently is left out: its K is in another frame).
    same = flags_e == flags_a
    codes_e, scales_e = fmt.split(rec_e)
    codes_a, scales_a = fmt.split(rec_a)
    assert (codes_e[same] != codes_a[same]).float().mean().item() <= 5e-3
    # The flag is the sign of K col_scale[0]; the other col scales of these finite tiles are positive.
    col0 = fmt.scale_offsets()["k_col_scale"]
    assert torch.equal(torch.signbit(scales_a[..., col0]), ~flags_a)
    assert not torch.signbit(scales_a[..., col0 + 1 : col0 + fmt.group]).any()
    assert not torch.signbit(scales_a[..., fmt.scale_offsets()["v_col_scale"] :]).any()
    k_e, v_e = ref.dequantize_tiles(rec_e, fmt)
    k_a, v_a = ref.dequantize_tiles(rec_a, fmt)
    for hat_e, hat_a, true in ((k_e, k_a, k_true), (v_e, v_a, v_true)):
        err_e = (hat_e - true).norm() / true.norm()
        err_a = (hat_a - true).norm() / true.norm()
        assert abs(err_a - err_e) <= 0.01 * err_e + 1e-6
        err_e_same = (hat_e[same] - true[same]).norm() / true[same].norm()
        assert (hat_a[same] - hat_e[same]).norm() / true[same].norm() <= 0.5 * err_e_same


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.float32, 64), (torch.float16, 96)])
def test_channel_weighted_k_frame_matches_reference(dtype, head_dim, device):
    """With per-tile channel weights (the expected squared query per channel) the kernel's K-frame flags are the
    reference's `choose_k_rotation(..., channel_weights)`, outside near ties; the weights do change flags; uniform
    weights give the unweighted rule's flags."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", head_dim, dtype)
    pairs = [synthetic_kv(64, 2, head_dim, dtype, seed=s, device=device) for s in range(8)]
    k = torch.stack([p[0] for p in pairs]).transpose(1, 2).contiguous()  # [N, H, G, D]
    v = torch.stack([p[1] for p in pairs]).transpose(1, 2).contiguous()
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(8, 2, head_dim, generator=gen) ** 4 * 10).to(device)
    kf = k.float()
    want = ref.choose_k_rotation(kf, channel_weights=w)
    assert not torch.equal(want, ref.choose_k_rotation(kf))
    assert torch.equal(ref.choose_k_rotation(kf, channel_weights=torch.full_like(w, 3.0)), ref.choose_k_rotation(kf))
    got = _flags(_quantize_tiles(k, v, fmt, w), fmt)
    rotated, plain = ref.k_frame_costs(kf, channel_weights=w)
    near_tie = (rotated - plain).abs() <= NEAR_TIE * plain
    assert torch.equal(got[~near_tie], want[~near_tie])
    assert torch.equal(_flags(ref.quantize_tile_records(k, v, fmt, k_weights=w), fmt), want)


def test_bad_channel_weights_are_refused():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    cache = fmt.allocate(2, 1)
    k = torch.zeros(64, 1, 64, dtype=torch.float16)
    starts = torch.zeros(1, dtype=torch.int32)
    for bad in (torch.ones(1, 1, 32), torch.ones(1, 1, 64, dtype=torch.float16), torch.ones(2, 1, 64)):
        with pytest.raises(ValueError, match="k_weights must be float32"):
            quantize_into_cache(k, k, starts, starts, cache, fmt, bad)
    with pytest.raises(ValueError, match="contiguous"):
        quantize_into_cache(k, k, starts, starts, cache, fmt, torch.ones(1, 1, 128)[..., ::2])


def test_kernel_writes_only_its_blocks(device):
    fmt, *_, blocks, _, actual = _quantize_both("kvarn_k4v2_g64", 64, torch.float16, device)
    untouched = [b for b in range(actual.shape[0]) if b not in blocks.tolist()]
    assert int(actual[untouched].abs().sum()) == 0
    assert all(int(actual[b].count_nonzero()) > 0 for b in blocks.tolist())


def test_out_of_range_block_ids_write_nothing(device):
    """Block ids are device data (not checked on the host): a tile whose id lies outside the cache is skipped, never
    written past it. The cache here is the first 3 blocks of a 5-block buffer, so a write past its end would land in
    the buffer's blocks 3-4."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64, torch.float16)
    k, v = synthetic_kv(3 * 64, 2, 64, torch.float16, seed=3, device=device)
    starts = torch.tensor([0, 64, 128], dtype=torch.int32, device=device)
    blocks = torch.tensor([3, 1, -1], dtype=torch.int32, device=device)
    buffer = fmt.allocate(5, 2, device)
    quantize_into_cache(k, v, starts, blocks, buffer[:3], fmt)
    expected = fmt.allocate(3, 2, device)  # the in-range tile alone
    quantize_into_cache(k[64:], v[64:], starts[:1], blocks[1:2], expected, fmt)
    assert torch.equal(buffer[:3], expected) and int(expected[1].count_nonzero()) > 0
    assert int(buffer[3:].count_nonzero()) == 0


def test_records_in_rows_wider_than_a_record(device):
    """vLLM pages count whole bytes per token: at head_dim 96 with 128-token tiles a (block, head) row is 10624 bytes
    for a 10560-byte record (`KVarNFormat.page_row_bytes`). The kernel writes the same records into such rows and
    leaves the rest of each row alone."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 96, torch.float16)
    assert (fmt.record_bytes, fmt.page_row_bytes) == (10560, 10624)
    k, v = synthetic_kv(2 * 128, 2, 96, torch.float16, seed=4, device=device)
    starts = torch.tensor([0, 128], dtype=torch.int32, device=device)
    blocks = torch.tensor([2, 0], dtype=torch.int32, device=device)
    rows = torch.full((3, 2, fmt.page_row_bytes), 0xAB, dtype=torch.uint8, device=device)
    plain = fmt.allocate(3, 2, device)
    quantize_into_cache(k, v, starts, blocks, rows[..., : fmt.record_bytes], fmt)
    quantize_into_cache(k, v, starts, blocks, plain, fmt)
    assert torch.equal(rows[[0, 2], :, : fmt.record_bytes], plain[[0, 2]])
    assert bool((rows[..., fmt.record_bytes :] == 0xAB).all()) and bool((rows[1] == 0xAB).all())


def test_empty_tile_list_is_a_no_op(device):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    cache = fmt.allocate(2, 1, device)
    k = torch.zeros(64, 1, 64, dtype=torch.float16, device=device)
    none = torch.empty(0, dtype=torch.int32, device=device)
    quantize_into_cache(k, k, none, none, cache, fmt)
    assert int(cache.sum()) == 0


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda k, s: (k.to(torch.int32), s), "not supported"),
        (lambda k, s: (k[..., :32], s), r"\[T, H, 64\]"),
        (lambda k, s: (k, s.long()), "int32"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    cache = fmt.allocate(2, 1)
    k = torch.zeros(64, 1, 64, dtype=torch.float16)
    starts = torch.zeros(1, dtype=torch.int32)
    k_bad, starts_bad = change(k, starts)
    with pytest.raises(ValueError, match=message):
        quantize_into_cache(k_bad, k_bad, starts_bad, starts_bad, cache, fmt)


def test_non_unit_head_dim_stride_is_refused():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    k = torch.zeros(64, 1, 128, dtype=torch.float16)[..., ::2]  # [T, H, D] with stride(-1) == 2
    starts = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="unit stride"):
        quantize_into_cache(k, k, starts, starts, fmt.allocate(1, 1), fmt)


def test_cache_of_wrong_layout_is_refused():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    k = torch.zeros(64, 1, 64, dtype=torch.float16)
    starts = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="does not hold kvarn_k4v2_g64 records"):
        quantize_into_cache(k, k, starts, starts, torch.zeros(1, 1, 100, dtype=torch.uint8), fmt)


@pytest.mark.parametrize("head_dim", [64, 96])
def test_nan_tile_leaves_other_tiles_intact(head_dim, device):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", head_dim)
    k, v = synthetic_kv(128, 1, head_dim, torch.float16, device=device)
    starts = torch.tensor([0, 64], dtype=torch.int32, device=device)
    blocks = torch.tensor([0, 1], dtype=torch.int32, device=device)
    clean, dirty = fmt.allocate(2, 1, device), fmt.allocate(2, 1, device)
    quantize_into_cache(k, v, starts, blocks, clean, fmt)
    k_bad = k.clone()
    k_bad[3, 0, 5] = float("nan")
    quantize_into_cache(k_bad, v, starts, blocks, dirty, fmt)
    assert torch.equal(dirty[1], clean[1])
    k_hat, _ = ref.dequantize_tiles(dirty[:1], fmt)
    assert not torch.isfinite(k_hat).all()


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_kernel_matches_reference_on_offset_heavy_tiles(offset, device):
    """Shifted one-pass moments: rows/columns whose mean dwarfs their spread still match the two-pass reference."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64, torch.float32)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2 * 64, 2, 64, generator=g) + offset * torch.rand(1, 2, 64, generator=g)
    v = torch.randn(2 * 64, 2, 64, generator=g) * (1 + torch.rand(2 * 64, 2, 1, generator=g)) + offset
    k, v = k.to(device), v.to(device)
    starts = torch.tensor([0, 64], dtype=torch.int32, device=device)
    expected, actual = fmt.allocate(2, 2, device), fmt.allocate(2, 2, device)
    ref.quantize_into_cache_ref(k, v, starts, starts // 64, expected, fmt)
    quantize_into_cache(k, v, starts, starts // 64, actual, fmt)
    codes_e, _ = fmt.split(expected)
    codes_a, _ = fmt.split(actual)
    assert (codes_e != codes_a).float().mean().item() <= 5e-3
    for hat_e, hat_a in zip(ref.dequantize_tiles(expected, fmt), ref.dequantize_tiles(actual, fmt), strict=True):
        assert (hat_a - hat_e).norm() <= 0.02 * hat_e.norm()


def test_float32_splits_exactly_into_three_bfloat16_parts():
    """The GPU rotation of float32 tiles feeds x = hi + mid + lo (bfloat16 each) to the tensor cores."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    hi = x.to(torch.bfloat16)
    rest = x - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    assert torch.equal(hi.float() + mid.float() + lo.float(), x)


def _forced_rotation_k_hat(k_tile, fmt):
    """K tile [G, D] quantized always rotated (format v1) and dequantized, with scales rounded to 16 bits."""
    k_rot = ref.rotate(k_tile)
    codes, row_scale, row_zero, col_scale = ref.quantize_matrices(k_rot.T[None], fmt.k_bits)
    row_scale, row_zero, col_scale = (s.to(fmt.scale_dtype).float() for s in (row_scale, row_zero, col_scale))
    k_hat_rot = ((codes.float() * row_scale[..., None] + row_zero[..., None]) * col_scale[:, None, :])[0].T
    return ref.rotate(k_hat_rot)


@pytest.mark.parametrize("preset,head_dim", [("kvarn_k4v2_g64", 64), ("kvarn_k4v2_g128", 96), ("kvarn_k4v2_g128", 128)])
def test_loud_sinusoid_channels_stay_unrotated(preset, head_dim, device):
    """RoPE'd key biases: rotating spreads the loud channels' swing over every channel, so K stays in its frame,
    and the record's K error beats the always-rotated format v1."""
    fmt = KVarNFormat.from_preset(preset, head_dim, torch.float32)
    k = _loud_channel_tile(fmt.group, head_dim)
    cost_rot, cost_raw = ref.k_frame_costs(k)
    assert cost_rot > 1.5 * cost_raw  # far from a tie
    v = torch.randn(fmt.group, head_dim, generator=torch.Generator().manual_seed(1))
    records = _quantize_tiles(k[None, None].to(device), v[None, None].to(device), fmt)
    assert not _flags(records, fmt).item()
    assert not ref.choose_k_rotation(k)
    k_hat, _ = ref.dequantize_tiles(records, fmt)
    k_hat, forced = k_hat[0, 0].cpu(), _forced_rotation_k_hat(k, fmt)
    # (head_dim 96: fewer quiet channels around the same four loud ones; 0.79 there, kernel and reference alike.)
    assert (k_hat - k).norm() < (0.85 if head_dim == 96 else 0.8) * (forced - k).norm()
    # Above all, the quiet channels (the ones queries read) keep a fine step instead of the loud channels' one.
    assert (k_hat - k)[:, 4:].norm() < 0.25 * (forced - k)[:, 4:].norm()
    # The reference writes the same record (up to rounding-boundary codes).
    expected = ref.quantize_tile_records(k[None, None], v[None, None], fmt)
    assert (expected[..., : fmt.code_bytes] != records[..., : fmt.code_bytes].cpu()).float().mean() <= 5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_heavy_tailed_tile_is_rotated(dtype, device):
    """Student-t (ν = 2) entries: per-channel ranges are set by rare extremes, which the rotation averages out."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64, dtype)
    torch.manual_seed(0)
    k = torch.distributions.StudentT(2.0).sample((1, 1, 64, 64)).to(dtype)
    cost_rot, cost_raw = ref.k_frame_costs(k.float())
    assert cost_rot < 0.8 * cost_raw
    records = _quantize_tiles(k.to(device), torch.randn(1, 1, 64, 64).to(dtype).to(device), fmt)
    assert _flags(records, fmt).item()
    assert ref.choose_k_rotation(k.float()).item()
    assert not torch.signbit(fmt.split(records)[1][..., fmt.scale_offsets()["k_col_scale"]]).any()


def test_k_frame_flag_round_trips(device):
    """Records of an unrotated and a rotated K tile (two KV heads) dequantize to their original-frame tiles."""
    fmt = KVarNFormat.from_preset("kvarn_k4v4_g64", 64, torch.float32)
    torch.manual_seed(0)
    loud = _loud_channel_tile(64, 64)
    heavy = torch.distributions.StudentT(2.0).sample((64, 64))
    k = torch.stack([loud, heavy])[None]  # [1, 2, G, D]
    v = torch.randn(1, 2, 64, 64)
    records = _quantize_tiles(k.to(device), v.to(device), fmt).cpu()
    k_stored, _, flags = ref.dequantize_records(records, fmt)
    assert flags.tolist() == [[False, True]]
    k_hat, v_hat = ref.dequantize_tiles(records, fmt)
    for head in range(2):
        assert (k_hat[0, head] - k[0, head]).norm() <= 0.1 * k[0, head].norm()
        assert (v_hat[0, head] - v[0, head]).norm() <= 0.15 * v[0, head].norm()
    # The stored frame is the flagged one: the unrotated head's record is K itself, the rotated one's is K·H.
    assert torch.equal(k_hat[0, 0], k_stored[0, 0])
    torch.testing.assert_close(k_hat[0, 1], ref.rotate(k_stored[0, 1]))
    # Clearing the flag (the sign bit) makes the unrotated record read as rotated: the wrong frame.
    scales = fmt.split(records)[1]
    scales[..., fmt.scale_offsets()["k_col_scale"]] = scales[..., fmt.scale_offsets()["k_col_scale"]].abs()
    k_wrong, _ = ref.dequantize_tiles(records, fmt)
    assert (k_wrong[0, 0] - k[0, 0]).norm() > k[0, 0].norm() * 0.5
    assert torch.equal(k_wrong[0, 1], k_hat[0, 1])


@triton.jit
def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _round_to(tl.load(x_ptr + i), tl.bfloat16))


def test_bfloat16_scale_rounding_keeps_every_nan(device):
    """A GPU's canonical NaN (0x7FFFFFFF) must not carry into the sign bit and round to −0.0: that silently
    dropped a NaN/Inf tile's poison on an H100 (found there; the interpreter's NaNs are 0x7FC00000)."""
    bits = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF - 2**32, 0x7FC00000, 0x7F800000, 0x3F808000, 0x3F818000, 0x477FFFFF],
                        dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    xp = torch.cat([x, torch.zeros(1)]).to(device)  # N must be a power of two
    outp = torch.empty(8, dtype=torch.bfloat16, device=device)
    _round_kernel[(1,)](xp, outp, N=8)
    out = outp[:7].float().cpu()
    assert out[:3].isnan().all()
    assert out[3] == float("inf")
    # Round-to-nearest-even on ordinary values: 1 + 2^-8 (a tie) → 1.0; 1 + 3·2^-8 (a tie) → 1 + 2^-6.
    assert out[4] == 1.0 and out[5] == 1.0 + 2**-6
    assert out[6] == 65536.0
