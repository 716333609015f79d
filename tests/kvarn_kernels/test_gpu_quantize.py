"""The compiled quantize kernel (tensor-core rotation, fused reductions, hardware lg2) versus the reference, GPU only.

The interpreter runs the float32 fallback of these paths, so only a GPU exercises them: every activation dtype
(float32 goes through the exact three-way bfloat16 split), head_dim 64/96/128/256, group 64/128, every launch
configuration the kernel picks, plus offset-heavy tiles, outlier tiles (guard), the K-frame choice (loud RoPE'd
channels stay unrotated, heavy tails rotate) and NaN poisoning.
"""

import pytest
import torch
import triton
import triton.language as tl

from kvarn_kernels import quantize
from kvarn_kernels import reference as ref
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.hadamard import hadamard_signs
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.reference import synthetic_kv

pytestmark = pytest.mark.gpu


# Range costs this close (relative) are near ties: the kernel's rotation equals the reference's up to float32
# summation order, so the K-frame flag of such a tile may legitimately come out either way (test_quantize.py).
NEAR_TIE = 1e-5


def _compare(k, v, fmt, n, k_weights=None, launch_overrides=None):
    starts = torch.arange(n, dtype=torch.int32, device="cuda") * fmt.group
    blocks = torch.randperm(n, device="cuda").to(torch.int32)
    h = k.shape[1]
    expected, actual = fmt.allocate(n, h, "cuda"), fmt.allocate(n, h, "cuda")
    ref.quantize_into_cache_ref(k, v, starts, blocks, expected, fmt, k_weights)
    quantize_into_cache(k, v, starts, blocks, actual, fmt, k_weights, launch_overrides)
    offs = (starts.long()[blocks.argsort()])[:, None] + torch.arange(fmt.group, device="cuda")
    kt, vt = k[offs].transpose(1, 2).float(), v[offs].transpose(1, 2).float()
    # K-frame flags (sign of K col_scale[0]) agree but for near ties; codes are compared where the frames agree.
    flags_e, flags_a = ref.dequantize_records(expected, fmt)[2], ref.dequantize_records(actual, fmt)[2]
    w = None if k_weights is None else k_weights[blocks.argsort()]  # in block order, like kt
    cost_rot, cost_raw = ref.k_frame_costs(kt, channel_weights=w)
    decided = (cost_rot - cost_raw).abs() > NEAR_TIE * cost_raw
    assert torch.equal(flags_e[decided], flags_a[decided])
    same = flags_e == flags_a
    ce, _ = fmt.split(expected)
    ca, _ = fmt.split(actual)
    assert (ce[same] != ca[same]).float().mean().item() <= 5e-3
    for hat_e, hat_a, true in zip(ref.dequantize_tiles(expected, fmt), ref.dequantize_tiles(actual, fmt), (kt, vt),
                                  strict=True):
        err_e = ((hat_e - true).norm() / true.norm()).item()
        err_a = ((hat_a - true).norm() / true.norm()).item()
        assert abs(err_a - err_e) <= 0.01 * err_e
    return actual


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("preset", ["kvarn_k4v2_g128", "kvarn_k4v4_g64"])
def test_quantize_matches_reference(dtype, head_dim, preset):
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    n = 48
    k, v = synthetic_kv(n * fmt.group, 4, head_dim, dtype, device="cuda")
    _compare(k, v, fmt, n)


@pytest.mark.parametrize("head_dim", [96, 128])
def test_rotation_is_exact_to_float32_summation(head_dim):
    """bf16 ±1 tensor-core products are exact: a tile of one-hot rows rotates to exact ±1/sqrt(D) rows (head_dim 96:
    H12 ⊗ H8, zero-padded to 128 in the kernel's operand)."""
    fmt = KVarNFormat.from_preset("kvarn_k4v4_g64", head_dim, torch.bfloat16)
    k = torch.randn(64, 1, head_dim, device="cuda").to(torch.bfloat16)
    rotated = ref.rotate(k)
    h = hadamard_signs(head_dim, torch.bfloat16, "cuda")[:head_dim, :head_dim].float() / head_dim**0.5
    torch.testing.assert_close(k.float() @ h, rotated, rtol=1e-6, atol=1e-6)
    _compare(k, k, fmt, 1)


@pytest.mark.parametrize("num_warps", [4, 8, 16])
def test_every_launch_configuration_matches(num_warps):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, torch.bfloat16)
    k, v = synthetic_kv(16 * 128, 2, 128, torch.bfloat16, seed=1, device="cuda")
    _compare(k, v, fmt, 16, launch_overrides={"num_warps": num_warps})


def test_offset_heavy_and_outlier_tiles_match():
    """Large row/column means (shifted one-pass moments) and single huge outliers (the guard)."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, torch.bfloat16)
    k, v = synthetic_kv(16 * 128, 2, 128, torch.float32, seed=2, device="cuda")
    k = k + 200.0 * torch.rand(1, 2, 128, device="cuda")
    v = v + 50.0
    v[5 * 128 + 3, 1, 7] = 3e4  # one outlier in tile 5
    k[9 * 128 + 70, 0, :] *= 500  # one outlier token in tile 9
    _compare(k.to(torch.bfloat16), v.to(torch.bfloat16), fmt, 16)


@pytest.mark.parametrize("head_dim", [96, 128])
def test_nan_poisons_only_its_tile(head_dim):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim, torch.bfloat16)
    k, v = synthetic_kv(4 * 128, 2, head_dim, torch.bfloat16, device="cuda")
    starts = torch.arange(4, dtype=torch.int32, device="cuda") * 128
    clean, dirty = fmt.allocate(4, 2, "cuda"), fmt.allocate(4, 2, "cuda")
    quantize_into_cache(k, v, starts, starts // 128, clean, fmt)
    v_bad = v.clone()
    v_bad[2 * 128 + 9, 1, 3] = float("inf")
    quantize_into_cache(k, v_bad, starts, starts // 128, dirty, fmt)
    assert torch.equal(dirty[[0, 1, 3]], clean[[0, 1, 3]])
    assert torch.equal(dirty[2, 0], clean[2, 0])
    _, v_hat = ref.dequantize_tiles(dirty[2:3], fmt)
    assert not torch.isfinite(v_hat[0, 1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_k_frame_choice_matches(dtype):
    """Loud sinusoid channels (RoPE'd key biases) stay unrotated, heavy-tailed tiles rotate: flags as the reference."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, dtype)
    g = torch.Generator().manual_seed(4)
    n = 8
    pos = torch.arange(n * 128, dtype=torch.float32)
    k = 0.5 * torch.randn(n * 128, 2, 128, generator=g)
    for pair, theta in enumerate((1.0, 0.3)):
        k[:, 0, 2 * pair] += 50 * torch.cos(pos * theta)
        k[:, 0, 2 * pair + 1] += 50 * torch.sin(pos * theta)
    # Student-t with 4 degrees of freedom from the seeded generator (z / sqrt(χ²₄ / 4)); with 2 degrees of
    # freedom a tile's single huge outlier sometimes makes the unrotated frame the cheaper one (the reference
    # agrees: the choice is data-driven).
    chi2 = torch.randn(4, n * 128, 128, generator=g).pow(2).sum(0)
    k[:, 1] = torch.randn(n * 128, 128, generator=g) / (chi2 / 4).sqrt()
    v = torch.randn(n * 128, 2, 128, generator=g)
    actual = _compare(k.to(dtype).cuda(), v.to(dtype).cuda(), fmt, n)
    flags = ref.dequantize_records(actual, fmt)[2]
    assert not flags[:, 0].any()
    assert flags[:, 1].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_weighted_k_frame_matches_reference(dtype, head_dim):
    """The HAS_WEIGHTS variant (k_frame="sink-queries"): per-tile channel weights, flags as the reference's
    outside near ties, and the weights really move flags (some differ from the unweighted kernel's)."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim, dtype)
    n, heads = 32, 4
    k, v = synthetic_kv(n * fmt.group, heads, head_dim, dtype, seed=5, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(6)
    w = torch.rand(n, heads, head_dim, device="cuda", generator=g).pow(4) * 10  # a few loud channels per tile
    weighted = _compare(k, v, fmt, n, w)
    plain = _compare(k, v, fmt, n)
    assert not torch.equal(ref.dequantize_records(weighted, fmt)[2], ref.dequantize_records(plain, fmt)[2])


@triton.jit
def _quotient_pair_kernel(num_ptr, step_ptr, fast_ptr, exact_ptr, R: tl.constexpr, C: tl.constexpr):
    offs = tl.program_id(0) * R * C + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    num = tl.load(num_ptr + offs)
    step = tl.load(step_ptr + tl.program_id(0) * R + tl.arange(0, R))
    tl.store(fast_ptr + offs, quantize._row_quotient(num, step, True))
    tl.store(exact_ptr + offs, tl.div_rn(num, step[:, None]))


@pytest.mark.parametrize("levels", [3, 15])
def test_row_quotient_equals_the_division(levels):
    """`_row_quotient` (a reciprocal per row and Markstein's correction) is the IEEE division bit for bit over the
    rounding pass's domain: steps from RTN_MIN_SCALE to 2^122 with numerators in [0, levels·step], including
    numerators within a few ulps of every half-integer multiple of the step (where the codes round)."""
    g = torch.Generator(device="cuda").manual_seed(levels)
    rows, r, c = 4096, 128, 128
    step = (2.0 ** (torch.rand(rows * r, device="cuda", generator=g) * 155 - 33)).float()
    step = step.clamp_min(ref.RTN_MIN_SCALE)
    frac = torch.rand(rows * r, c, device="cuda", generator=g) * levels
    ties = (torch.randint(0, levels, (rows * r, c), device="cuda", generator=g) + 0.5).float()
    half = torch.rand(rows * r, c, device="cuda", generator=g) < 0.5
    num = torch.where(half, ties, frac) * step[:, None]
    nudge = torch.randint(-3, 4, num.shape, device="cuda", generator=g).to(torch.int32)
    num = torch.where(half, (num.view(torch.int32) + nudge).view(torch.float32), num).clamp_min(0.0)
    fast, exact = torch.empty_like(num), torch.empty_like(num)
    _quotient_pair_kernel[(rows,)](num, step, fast, exact, R=r, C=c)
    assert torch.equal(fast.view(torch.int32), exact.view(torch.int32))
