"""Triton quantize kernel versus the PyTorch reference (interpreter on CPU, compiled on GPU)."""

import pytest
import torch

from kvarn_kernels import reference as ref
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.testing import synthetic_kv


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
    ],
)
def test_kernel_matches_reference(preset, head_dim, dtype, device):
    fmt, k, v, starts, blocks, expected, actual = _quantize_both(preset, head_dim, dtype, device)
    codes_e, scales_e = fmt.split(expected)
    codes_a, scales_a = fmt.split(actual)
    # fp32 reductions in another order may flip a rounding boundary: allow ≤ 0.5 % of codes to differ.
    assert (codes_e != codes_a).float().mean().item() <= 5e-3
    k_e, v_e = ref.dequantize_tiles(expected[blocks.long()], fmt)
    k_a, v_a = ref.dequantize_tiles(actual[blocks.long()], fmt)
    offs = starts.long()[:, None] + torch.arange(fmt.group, device=device)
    k_true = k[offs].transpose(1, 2).float()
    v_true = v[offs].transpose(1, 2).float()
    for hat_e, hat_a, true in ((k_e, k_a, k_true), (v_e, v_a, v_true)):
        err_e = (hat_e - true).norm() / true.norm()
        err_a = (hat_a - true).norm() / true.norm()
        assert abs(err_a - err_e) <= 0.01 * err_e + 1e-6
        assert (hat_a - hat_e).norm() / true.norm() <= 0.5 * err_e


def test_kernel_writes_only_its_blocks(device):
    fmt, *_, blocks, _, actual = _quantize_both("kvarn_k4v2_g64", 64, torch.float16, device)
    untouched = [b for b in range(actual.shape[0]) if b not in blocks.tolist()]
    assert int(actual[untouched].abs().sum()) == 0
    assert all(int(actual[b].count_nonzero()) > 0 for b in blocks.tolist())


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


def test_nan_tile_leaves_other_tiles_intact(device):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64)
    k, v = synthetic_kv(128, 1, 64, torch.float16, device=device)
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
