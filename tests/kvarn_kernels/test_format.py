import pytest
import torch

from kvarn_kernels.format import PRESETS, KVarNFormat, check_alignment, scale_dtype_for


def test_k4v2_g128_d128_record_matches_published_compactness():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128)
    assert fmt.record_bytes == 13824
    assert fmt.bytes_per_token_per_head == 108
    assert fmt.bits_per_element == pytest.approx(3.375)
    assert fmt.compression_vs_16bit == pytest.approx(512 / 108)
    info = fmt.describe()
    assert info["k_bits_per_element"] == pytest.approx(4.375)
    assert info["v_bits_per_element"] == pytest.approx(2.375)


@pytest.mark.parametrize("head_dim,minimum", [(64, 4.4), (96, 4.65), (128, 4.74), (256, 4.7)])
def test_k4v2_compression_goals(head_dim, minimum):
    assert KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim).compression_vs_16bit >= minimum


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_every_section_is_16_byte_aligned(preset, head_dim):
    check_alignment(KVarNFormat.from_preset(preset, head_dim))


def test_head_dim_96_record_pays_no_padding():
    """Phi-3-mini's head_dim 96: kernels run 128 wide in registers, but every section is sized with D = 96."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 96)
    assert fmt.k_code_bytes == 96 * 128 * 4 // 8 == 6144
    assert fmt.v_code_bytes == 96 * 128 * 2 // 8 == 3072
    assert fmt.num_scales == 3 * 96 + 3 * 128
    assert fmt.record_bytes == 6144 + 3072 + 2 * (3 * 96 + 3 * 128) == 10560
    assert fmt.bytes_per_token_per_head == 82.5
    assert fmt.bits_per_element == pytest.approx(3.4375)
    assert fmt.compression_vs_16bit == pytest.approx(4 * 96 / 82.5)  # 4.65x
    info = fmt.describe()
    assert info["sections"] == {"k_codes": [0, 6144], "v_codes": [6144, 3072], "scales": [9216, 1344]}
    assert info["scale_word_offsets"] == {"k_row_scale": 0, "k_row_zero": 96, "k_col_scale": 192, "v_row_scale": 320,
                                          "v_row_zero": 448, "v_col_scale": 576}
    assert fmt.layout()["k_frame_flag"] == 192
    padded = KVarNFormat.from_preset("kvarn_k4v2_g128", 128)
    assert fmt.record_bytes < 0.77 * padded.record_bytes  # 96 of 128 channels' codes, 2/3 of their D scales


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_page_rows_count_whole_bytes_per_token(preset, head_dim):
    """vLLM sizes pages in whole bytes per token: record_bytes / G rounded up, exact except at head_dim 96 with
    128-token tiles (k4v2: 82.5 -> 83 bytes, a 10624-byte row for a 10560-byte record)."""
    fmt = KVarNFormat.from_preset(preset, head_dim)
    assert fmt.slot_bytes == -(-fmt.record_bytes // fmt.group) and fmt.page_row_bytes % 16 == 0
    exact = not (head_dim == 96 and fmt.group == 128)
    assert (fmt.page_row_bytes == fmt.record_bytes) == exact
    assert fmt.page_row_bytes - fmt.record_bytes == (0 if exact else 64)


def test_caches_with_wide_rows_are_accepted_and_bad_strides_refused():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 96)
    fmt.check_cache(torch.zeros(2, 3, fmt.page_row_bytes, dtype=torch.uint8)[..., : fmt.record_bytes])
    fmt.check_cache(torch.zeros(2, 3, 2 * fmt.record_bytes, dtype=torch.uint8)[..., : fmt.record_bytes])
    misaligned = torch.zeros(2, 3, fmt.record_bytes + 8, dtype=torch.uint8)[..., : fmt.record_bytes]
    with pytest.raises(ValueError, match="one record per row"):
        fmt.check_cache(misaligned)
    overlapping = torch.zeros(2 * 3 * fmt.record_bytes, dtype=torch.uint8).as_strided(
        (2, 3, fmt.record_bytes), (3 * fmt.record_bytes, fmt.record_bytes // 2, 1))
    with pytest.raises(ValueError, match="one record per row"):
        fmt.check_cache(overlapping)


def test_unsupported_head_dim_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"head_dim 80 is not supported: use one of \(64, 96, 128, 256\)"):
        KVarNFormat.from_preset("kvarn_k4v2_g128", 80)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="kvarn_k3v2.*kvarn_k4v2_g128"):
        KVarNFormat.from_preset("kvarn_k3v2", 128)


def test_scale_dtype_keeps_bf16_range():
    assert scale_dtype_for(torch.float16) == torch.float16
    assert scale_dtype_for(torch.bfloat16) == torch.bfloat16
    assert scale_dtype_for(torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        scale_dtype_for(torch.int8)


def test_split_views_address_the_record_bytes():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", 64, torch.bfloat16)
    cache = fmt.allocate(3, 2)
    codes, scales = fmt.split(cache)
    assert codes.shape == (3, 2, fmt.code_bytes) and scales.shape == (3, 2, fmt.num_scales)
    scales[1, 1, 0] = 1.0  # bfloat16 1.0 = 0x3F80, little endian
    assert cache[1, 1, fmt.code_bytes].item() == 0x80 and cache[1, 1, fmt.code_bytes + 1].item() == 0x3F
    assert int(cache.sum()) == 0x80 + 0x3F


def test_cache_of_another_layout_is_rejected():
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128)
    other = KVarNFormat.from_preset("kvarn_k4v4_g128", 128).allocate(1, 1)
    with pytest.raises(ValueError, match="does not hold kvarn_k4v2_g128 records"):
        fmt.split(other)
