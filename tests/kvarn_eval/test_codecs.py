"""kvarn_eval.codecs: the one tile-codec interface of the quality reports, simulated caches and baselines."""

from __future__ import annotations

import pytest
import torch

from kvarn_eval.codecs import kivi_codec, kvarn_codec, kvarn_variant_codec, rtn
from kvarn_kernels.hadamard import rotate
from kvarn_kernels.reference import synthetic_kv


def tiles(n: int, dtype: torch.dtype, group: int = 64, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = synthetic_kv(n * group, 2, dim, dtype, seed=5)
    return (x.view(n, group, 2, dim).transpose(1, 2).contiguous() for x in (k, v))


def test_rtn_keeps_values_on_its_grid_and_rounds_half_up():
    x = torch.tensor([[0.0, 0.5, 1.0, 1.5], [0.0, 0.25, 0.375, 3.0]])
    assert rtn(x[:1], 2).tolist() == x[:1].tolist()  # step 0.5: every value is on the grid
    # step 1.0 on the second row: 0.25 rounds down, 0.375 rounds down, nothing rounds to even
    assert rtn(x[1:], 2).tolist() == [[0.0, 0.0, 0.0, 3.0]]
    assert rtn(torch.tensor([[0.0, 1.5, 3.0]]), 1).tolist() == [[0.0, 3.0, 3.0]]  # half (1.5 / 3) rounds up


def test_rotation_only_ablation_is_per_row_rtn_of_the_rotated_tiles():
    """iters=0 with K always rotated: plain min-max RTN of rotated K per channel and rotated V per token, bit for
    bit (the quality report's abl-rot-only)."""
    k, v = tiles(3, torch.float32)
    k_hat, v_hat = kvarn_variant_codec(4, 2, iters=0, scale_dtype=torch.float32, rotate_k=True)(k, v)
    assert torch.equal(k_hat, rotate(rtn(rotate(k), 4, -2)))
    assert torch.equal(v_hat, rotate(rtn(rotate(v), 2, -1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_variant_codec_with_k_always_rotated_is_format_v1(dtype):
    k, v = tiles(2, dtype)
    got = kvarn_variant_codec(4, 2, rotate_k=True)(k, v)
    want = kvarn_codec("kvarn_k4v2_g64", rotate_k=True)(k, v)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kivi_scales_follow_the_input_format_unless_given():
    k, v = tiles(2, torch.float16)
    default, fp16, bf16 = (kivi_codec(2, 2, sdt)(k, v) for sdt in (None, torch.float16, torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(default, fp16, strict=True))
    assert not torch.equal(default[0], bf16[0])  # bfloat16 scales round differently
    assert default[0].dtype == torch.float16


def test_kvarn_codec_names_a_bad_preset():
    k, v = tiles(1, torch.float32)
    with pytest.raises(ValueError, match="preset 'kvarn_k3v3_g64' is unknown"):
        kvarn_codec("kvarn_k3v3_g64")(k, v)
