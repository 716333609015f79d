import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn_kernels import reference as ref
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.hadamard import hadamard, hadamard_signs, padded_dim, paley12
from kvarn_kernels.reference import synthetic_kv


@given(bits=st.sampled_from([2, 4]), rows=st.integers(1, 5), width=st.integers(1, 8), seed=st.integers(0, 10**6))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_round_trip_is_exact(bits, rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, 4 * width), generator=g, dtype=torch.uint8)
    packed = ref.pack(codes, bits)
    assert packed.shape == (rows, width * bits // 2)
    assert torch.equal(ref.unpack(packed, bits), codes)


def test_pack_is_planar_little_endian():
    codes = torch.tensor([[1, 2, 3, 0, 2, 1, 0, 3]], dtype=torch.uint8)  # word j holds j, j+2, j+4, j+6
    assert ref.pack(codes, 2).tolist() == [[1 | 3 << 2 | 2 << 4 | 0 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]]
    codes = torch.tensor([[0x1, 0x2, 0x3, 0x4]], dtype=torch.uint8)  # one 16-bit word 0x4321
    assert ref.pack(codes, 4).tolist() == [[0x21, 0x43]]


@pytest.mark.parametrize("dim", [12, 64, 96, 128, 256])
def test_hadamard_is_symmetric_orthonormal(dim):
    h = ref.hadamard(dim, dtype=torch.float64)
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    # The kernels' ±1 form: a Hadamard matrix (H·Hᵀ = D·I, exactly), symmetric, zero-padded to a power of two.
    signs = hadamard_signs(dim, torch.float32, "cpu").double()
    p = padded_dim(dim)
    assert signs.shape == (p, p) and int(signs[dim:].count_nonzero()) == int(signs[:, dim:].count_nonzero()) == 0
    s = signs[:dim, :dim]
    assert torch.equal(s.abs(), torch.ones_like(s)) and torch.equal(s, s.T)
    assert torch.equal(s @ s.T, dim * torch.eye(dim, dtype=torch.float64))


def test_order_96_is_paley12_kron_sylvester8():
    """H96 = H12 ⊗ H8 with H12 the symmetric Paley II matrix (q = 5): a Kronecker product of symmetric Hadamard
    matrices is a symmetric Hadamard matrix, so H = Hᵀ = H⁻¹ after scaling, as the kernels assume."""
    h12 = paley12()
    assert torch.equal(h12, h12.T) and torch.equal(h12 @ h12.T, 12 * torch.eye(12, dtype=torch.float64))
    h8 = hadamard(8, torch.float64) * 8**0.5
    assert torch.equal(hadamard(96, torch.float64) * 96**0.5, torch.kron(h12, h8.round()))


@pytest.mark.parametrize("dim", [80, 36, 0])
def test_hadamard_rejects_unsupported_orders(dim):
    with pytest.raises(ValueError, match=rf"Hadamard size {dim} is not supported"):
        ref.hadamard(dim)


@pytest.mark.parametrize("bits", [2, 4])
def test_head_dim_96_record_stores_96_channel_rows(bits):
    """Records at D = 96: K and V codes are 96 channel rows each of G planar tokens (V's [G, D] matrix transposed),
    row d at byte d·G·b/8 of its section, unpadded; the record round-trips through the codec."""
    fmt = KVarNFormat.from_preset("kvarn_k4v4_g64" if bits == 4 else "kvarn_k2v2_g128", 96)
    k, v = _tiles(torch.float32, d=96, g=fmt.group, n=1, h=1)
    records = ref.quantize_tile_records(k, v, fmt, rotate_k=False)
    kc, *_ = ref.quantize_matrices(k[0].transpose(1, 2), fmt.k_bits)  # K matrix [1, D, G]: rows = channels
    vc, *_ = ref.quantize_matrices(ref.rotate(v[0]), fmt.v_bits)  # V matrix [1, G, D]: rows = tokens
    row = fmt.group * bits // 8
    k_rows = records[0, 0, : fmt.k_code_bytes].reshape(96, row)
    v_rows = records[0, 0, fmt.k_code_bytes : fmt.code_bytes].reshape(96, row)
    assert torch.equal(k_rows, ref.pack(kc[0], bits)) and torch.equal(ref.unpack(k_rows, bits), kc[0])
    assert torch.equal(v_rows, ref.pack(vc[0].T, bits)) and torch.equal(ref.unpack(v_rows, bits), vc[0].T)
    k_hat, v_hat = ref.dequantize_tiles(records, fmt)
    assert (k_hat - k.float()).norm() < (0.1 if bits == 4 else 0.25) * k.float().norm()
    assert (v_hat - v.float()).norm() < (0.15 if bits == 4 else 0.6) * v.float().norm()


def test_normalization_lowers_imbalance_on_outlier_tiles():
    k, _ = synthetic_kv(128, 4, 128, torch.float32, outlier_channels=6)
    tiles = ref.rotate(k).transpose(0, 1).transpose(1, 2)  # [H, D, G]: K matrices
    log_row, log_col = ref.normalize_scales(tiles)
    before = ref._imbalance(ref._std(tiles, 1), ref._std(tiles, 2))
    bal = ref._balanced(tiles, log_row, log_col)
    after = ref._imbalance(ref._std(bal, 1), ref._std(bal, 2))
    assert torch.all(after <= before)
    assert torch.all(after < 0.8 * before)


def _tiles(dtype, d=64, g=64, n=2, h=2, seed=0):
    k, v = synthetic_kv(n * g, h, d, dtype, seed=seed)
    return k.reshape(n, g, h, d).transpose(1, 2), v.reshape(n, g, h, d).transpose(1, 2)


def test_quantization_is_deterministic():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    k, v = _tiles(torch.float16)
    assert torch.equal(ref.quantize_tile_records(k, v, fmt), ref.quantize_tile_records(k, v, fmt))


@pytest.mark.parametrize("value", [0.0, 3.25, -7.5])
def test_constant_tiles_reconstruct_exactly(value):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    k = torch.full((1, 1, 64, 64), value, dtype=torch.float16)
    records = ref.quantize_tile_records(k, k, fmt)
    k_hat, v_hat = ref.dequantize_tiles(records, fmt)
    assert torch.isfinite(records.float()).all()
    assert torch.allclose(k_hat, k.float(), atol=1e-2 * max(abs(value), 1))
    assert torch.allclose(v_hat, k.float(), atol=1e-2 * max(abs(value), 1))


def test_bf16_activations_beyond_fp16_range_stay_finite():
    fmt = KVarNFormat.from_preset("kvarn_k4v4_g64", 64, torch.bfloat16)
    k, v = _tiles(torch.float32)
    k, v = (k * 1e5).to(torch.bfloat16), (v * 1e5).to(torch.bfloat16)  # |x| up to ~1e7 > 65504
    k_hat, v_hat = ref.dequantize_tiles(ref.quantize_tile_records(k, v, fmt), fmt)
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()
    assert (k_hat - k.float()).norm() / k.float().norm() < 0.15
    assert (v_hat - v.float()).norm() / v.float().norm() < 0.15


def test_huge_outlier_token_does_not_destroy_other_tokens():
    fmt = KVarNFormat.from_preset("kvarn_k4v4_g64", 64, torch.bfloat16)
    k, v = _tiles(torch.float32, n=1, h=1)
    v[0, 0, 5] = 3e4
    k_hat, v_hat = ref.dequantize_tiles(ref.quantize_tile_records(k.bfloat16(), v.bfloat16(), fmt), fmt)
    others = torch.ones(64, dtype=torch.bool)
    others[5] = False
    v_ref = v.bfloat16().float()[0, 0, others]
    assert (v_hat[0, 0, others] - v_ref).norm() / v_ref.norm() < 0.2


def test_nan_tile_is_contained_to_its_own_record():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    k, v = _tiles(torch.float16)
    k[0, 0, 3, 7] = float("nan")
    records = ref.quantize_tile_records(k, v, fmt)
    k_hat, v_hat = ref.dequantize_tiles(records, fmt)
    assert not torch.isfinite(k_hat[0, 0]).all()
    clean = ref.quantize_tile_records(k[1:], v[1:], fmt)
    assert torch.equal(records[1:], clean)
    assert torch.isfinite(k_hat[1]).all() and torch.isfinite(k_hat[0, 1]).all()


def test_attention_over_16bit_only_history_is_exact_attention():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64, torch.float32)
    k, v = synthetic_kv(40, 2, 64, torch.float32)
    from kvarn_kernels.state import build_paged_kv

    state = build_paged_kv([k], [v], fmt, ref.quantize_into_cache_ref)
    q = torch.randn(1, 4, 64)
    out = ref.paged_attention_ref(q, state, torch.tensor([0, 1], dtype=torch.int32))
    kk, vv = k.transpose(0, 1).repeat_interleave(2, 0), v.transpose(0, 1).repeat_interleave(2, 0)
    exact = torch.softmax(q[0][:, None] @ kk.transpose(1, 2) / 8, -1) @ vv
    assert torch.allclose(out[0], exact[:, 0], atol=1e-5)


def _rope_bias_tile(g: int = 128, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Keys with a few loud channel pairs that rotate with position (a RoPE'd key bias) over quiet noise."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(g, d, generator=gen) * 0.5
    pos = torch.arange(g, dtype=torch.float32)
    for pair, theta in enumerate((0.9, 0.3)):
        k[:, 2 * pair] += 40 * torch.cos(pos * theta)
        k[:, 2 * pair + 1] += 40 * torch.sin(pos * theta)
    return k


def test_k_frame_flag_keeps_rope_bias_keys_unrotated_and_round_trips():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 64, torch.float16)
    gen = torch.Generator().manual_seed(1)
    loud = _rope_bias_tile()
    heavy = torch.distributions.StudentT(2.0).sample((128, 64)).clamp(-200, 200)
    k = torch.stack([loud, heavy])[None]  # [1, 2, G, D]
    v = torch.randn(1, 2, 128, 64, generator=gen)
    assert ref.choose_k_rotation(k).tolist() == [[False, True]]
    records = ref.quantize_tile_records(k.half(), v.half(), fmt)
    _, _, k_rotated = ref.dequantize_records(records, fmt)
    assert k_rotated.tolist() == [[False, True]]
    k_hat, _ = ref.dequantize_tiles(records, fmt)
    err = ((k_hat - k.half().float()).norm(dim=(-2, -1)) / k.half().float().norm(dim=(-2, -1)))[0]
    # Forced rotation of the loud tile: what format v1 did.
    kc, krs, krz, kcs = ref.quantize_matrices(ref.rotate(loud.half()).T[None], 4)
    forced = ref.rotate(((kc.float() * krs[..., None] + krz[..., None]) * kcs[:, None, :])[0].T)
    # What matters to queries on the quiet channels: their error (the rotation spreads the loud ones onto them).
    quiet = loud.half().float()[:, 4:]
    err_quiet = ((k_hat[0, 0, :, 4:] - quiet).norm() / quiet.norm()).item()
    err_quiet_forced = ((forced[:, 4:] - quiet).norm() / quiet.norm()).item()
    assert err_quiet < 0.5 * err_quiet_forced, (err_quiet, err_quiet_forced)
    assert err[1].item() < 0.2
