"""Triton paged attention (decode and chunk) versus the PyTorch reference."""

import dataclasses

import pytest
import torch
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn_kernels import attention
from kvarn_kernels import reference as ref
from kvarn_kernels.attention import (
    choose_num_splits,
    chunk_attention,
    decode_attention,
    one_tile_splits,
    paged_attention,
    split_plan,
    tile_groups,
)
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.reference import sixteen_bit_decode, synthetic_kv
from kvarn_kernels.state import build_paged_kv

# Kernels use tf32 tensor-core dots on the GPU (exact in the interpreter): tolerances cover tf32 rounding,
# plus one unit in the last place of the 16-bit output (a different summation order may flip a rounding).
TOL = {torch.float32: 5e-3, torch.float16: 8e-3, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _state(lens, hkv, head_dim, dtype, device, preset="kvarn_k4v2_g64", seed=0):
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    kv = [synthetic_kv(n, hkv, head_dim, dtype, seed=seed + i, device=device) for i, n in enumerate(lens)]
    gen = torch.Generator().manual_seed(seed)
    return build_paged_kv([k for k, _ in kv], [v for _, v in kv], fmt, ref.quantize_into_cache_ref, 2, gen)


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


# head_dim 96 (Phi-3-mini) runs 128 wide in registers with its padded channels masked: a few of the same cases.
DECODE_CASES = [(dtype, n_rep, splits, 64) for dtype in (torch.float16, torch.bfloat16, torch.float32)
                for n_rep, splits in ((1, 1), (3, 2), (4, 3))] + [
    (torch.float16, 4, 3, 96), (torch.bfloat16, 1, 1, 96), (torch.float32, 3, 2, 96)]


@pytest.mark.parametrize("dtype,n_rep,splits,head_dim", DECODE_CASES)
def test_decode_matches_reference(dtype, n_rep, splits, head_dim, device):
    lens = [5, 64, 64 + 3, 128, 4 * 64 + 17]  # sink only, exact tile edges, tails, several tiles
    state = _state(lens, 2, head_dim, dtype, device)
    q = torch.randn(len(lens), 2 * n_rep, head_dim, generator=torch.Generator().manual_seed(n_rep)).to(device, dtype)
    expected = ref.paged_attention_ref(q, state, _cu([1] * len(lens), device))
    actual = decode_attention(q, state, num_splits=splits)
    assert actual.dtype == dtype
    if device == "cuda" and dtype != torch.float32:
        # 16-bit tensor-core operands: judged against the floor of 16-bit attention over the same history, plus
        # one step of the output dtype at each value (outputs are rounded to it: at |value| >= 8 a bfloat16 step is
        # 0.0625; an H100 over 30 query draws, v0 and the current kernel alike, reached 1.6x the floor alone).
        step = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
        err = ((actual.float() - expected.float()).abs() - step * expected.float().abs()).max().item()
        floor = (sixteen_bit_decode(q, state) - expected.float()).abs().max().item()
        assert err <= max(TOL[dtype], 2 * floor), f"error {err:.4f} beyond one output step; 16-bit's {floor:.4f}"
    else:
        torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=RTOL[dtype])


def test_decode_head_dim_128_k4v4(device):
    state = _state([200, 300], 1, 128, torch.float16, device, "kvarn_k4v4_g64")
    q = torch.randn(2, 4, 128, device=device).half()
    expected = ref.paged_attention_ref(q, state, _cu([1, 1], device))
    torch.testing.assert_close(decode_attention(q, state, num_splits=2).float(), expected.float(), atol=8e-3, rtol=0)


@pytest.mark.parametrize("dtype,n_rep", [(torch.bfloat16, 1), (torch.bfloat16, 7), (torch.float16, 4),
                                         (torch.float16, 8)])
def test_decode_register_capped_builds(dtype, n_rep, device):
    """head_dim 128 one-tile split builds run capped at 168 registers (`Tuning.one_tile_maxnreg`; bfloat16 GQA 4 is
    not capped, float16 is at every GQA size): on a GPU that is the build that runs (float16 with its PTX unpack); its
    sm_90 compile is checked (test_compile_sm90)."""
    assert (128, dtype, n_rep) in attention.TUNING.one_tile_maxnreg
    state = _state([200, 4 * 128 + 9], 1, 128, dtype, device, "kvarn_k4v2_g128")
    q = torch.randn(2, n_rep, 128, generator=torch.Generator().manual_seed(n_rep)).to(device, dtype)
    expected = ref.paged_attention_ref(q, state, _cu([1, 1], device)).float()
    # As test_decode_matches_reference judges 16-bit operands: beyond one output step, within the 16-bit floor.
    step = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    err = ((decode_attention(q, state, num_splits=3).float() - expected).abs() - step * expected.abs()).max().item()
    floor = (sixteen_bit_decode(q, state) - expected).abs().max().item()
    assert err <= max(TOL[dtype], 2 * floor), (err, floor)


def test_rotated_split_outputs_are_unrotated_by_the_merge(device):
    """One-tile decode splits that attend no 16-bit token leave their output rotated; the merge un-rotates their
    weighted sum (attention.merge_unrotates). 10 tiles over 6 splits: the sink's and the tail's splits un-rotate their
    own tiles' share, the others do not; a sequence whose history is all 16-bit has no rotated output at all."""
    assert attention.merge_unrotates(6, 1, 64, 1, False)
    assert not attention.merge_unrotates(1, 1, 64, 1, False)  # one split: the kernel stores the output itself
    assert not attention.merge_unrotates(6, 4, 128, 1, False)  # row groups
    assert not attention.merge_unrotates(6, 1, 64, 1, True)  # new tokens (chunk build)
    assert not attention.merge_unrotates(6, 1, 256, 1, False)
    assert not attention.merge_unrotates(6, 1, 96, 1, False)  # the merge's un-rotation factors powers of two only
    lens = [11 * 64 + 5, 100, 3 * 64]
    state = _state(lens, 2, 64, torch.bfloat16, device)
    q = torch.randn(len(lens), 4, 64, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    expected = ref.paged_attention_ref(q, state, _cu([1] * len(lens), device)).float()
    err = ((decode_attention(q, state, num_splits=6).float() - expected).abs() - 2**-7 * expected.abs()).max().item()
    floor = (sixteen_bit_decode(q, state) - expected).abs().max().item()
    assert err <= max(TOL[torch.bfloat16], 2 * floor), (err, floor)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_head_dim_256(splits, device):
    """head_dim 256: one split stores the output from the attention kernel; 3 (not a power of two) go through the
    merge, whose one [splits, D] load is padded to 4 splits and masked."""
    state = _state([300, 140], 1, 256, torch.bfloat16, device, "kvarn_k4v2_g64")
    q = torch.randn(2, 2, 256, generator=torch.Generator().manual_seed(0)).to(device).bfloat16()
    expected = ref.paged_attention_ref(q, state, _cu([1, 1], device))
    actual = decode_attention(q, state, num_splits=splits)
    # rtol: outputs are bfloat16, whose step is 2^-7 of the value (0.0625 from 8 on: this q has such outputs).
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2**-7)


@pytest.mark.parametrize("splits", [5, 64])
def test_idle_and_many_splits_merge_exactly(splits, device):
    """More splits than tiles: most programs see no key (l = 0, m = -inf) and must weigh 0 in the merge; 5 splits
    pad the merge's one [splits, D] load to 8 rows, 64 is the most `choose_num_splits` picks. Decode and a chunk."""
    lens = [5, 300, 129]
    state = _state(lens, 2, 64, torch.float32, device)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(3, 4, 64, generator=gen).to(device)
    expected = ref.paged_attention_ref(q, state, _cu([1, 1, 1], device))
    torch.testing.assert_close(decode_attention(q, state, num_splits=splits), expected, atol=1e-5, rtol=1e-5)
    n = [3, 1, 4]
    qc = torch.randn(sum(n), 4, 64, generator=gen).to(device)
    kn = torch.randn(sum(n), 2, 64, generator=gen).to(device)
    expected = ref.paged_attention_ref(qc, state, _cu(n, device), kn, kn, _cu(n, device))
    actual = chunk_attention(qc, kn, kn, _cu(n, device), _cu(n, device), max(n), state, num_splits=splits)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits,dense_units", [(2, 1), (3, 1), (4, 1), (7, 1), (3, 3), (7, 3), (16, 3)])
def test_work_units_cover_every_key_once(splits, dense_units, device):
    """Splits take runs of work units (sink, tiles, tail + new tokens): here the sink sits alone or with tiles, and
    the tail lands on the last busy split, which is often not the last split. In decode a 16-bit block weighs
    `dense_units` units (3: it may span splits, one of which attends it while the others do nothing; chunks keep 1).
    Every key must count exactly once."""
    tuning = dataclasses.replace(attention.TUNING, dense_units=dense_units)
    lens = [1, 64, 65, 128, 200, 256, 300, 64 * 7 + 13]
    state = _state(lens, 2, 64, torch.float32, device)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(len(lens), 4, 64, generator=gen).to(device)
    expected = ref.paged_attention_ref(q, state, _cu([1] * len(lens), device))
    torch.testing.assert_close(decode_attention(q, state, num_splits=splits, tuning=tuning), expected, atol=1e-5,
                               rtol=1e-5)
    n = [2] * len(lens)
    qc = torch.randn(sum(n), 4, 64, generator=gen).to(device)
    kn = torch.randn(sum(n), 2, 64, generator=gen).to(device)
    expected = ref.paged_attention_ref(qc, state, _cu(n, device), kn, kn, _cu(n, device))
    actual = chunk_attention(qc, kn, kn, _cu(n, device), _cu(n, device), max(n), state, num_splits=splits,
                             tuning=tuning)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_rep,groups,head_dim", [(2, 4, 64), (3, 4, 64), (4, 4, 64), (4, 2, 64), (8, 2, 64),
                                                    (4, 4, 96)])
def test_row_groups_attend_every_tile_once(n_rep, groups, head_dim, device):
    """Decode attends 4 tiles at once, one per row group (the padding rows of the 16-row dots). Runs of 10, 5 and 1
    tiles per split (full groups, a partial last group, a group with one tile), GQA 2/3/4/8 (3 pads its groups to 4
    rows), 2 groups too (not used by default), one split and several: every tile must count once, as one tile at a
    time does."""
    # Groups from the first unit (16 by default).
    tuning = dataclasses.replace(attention.TUNING, group_min_units=1, max_tile_groups=groups)
    lens = [64 * 11 + 5, 64 * 6, 64 * 2 + 9]
    state = _state(lens, 2, head_dim, torch.float16, device)
    q = torch.randn(3, 2 * n_rep, head_dim, generator=torch.Generator().manual_seed(n_rep)).to(device, torch.float16)
    expected = ref.paged_attention_ref(q, state, _cu([1] * 3, device))
    grouped = {s: decode_attention(q, state, num_splits=s, tuning=tuning) for s in (1, 2)}
    one_at_a_time = decode_attention(q, state, num_splits=1, tuning=dataclasses.replace(tuning, max_tile_groups=1))
    for out in (*grouped.values(), one_at_a_time):
        torch.testing.assert_close(out.float(), expected.float(), atol=TOL[torch.float16], rtol=RTOL[torch.float16])
    # Only the summation order differs from one tile at a time.
    torch.testing.assert_close(grouped[1].float(), one_at_a_time.float(), atol=2e-3, rtol=2**-10)


def test_records_in_rows_wider_than_a_record_attend_alike(device):
    """vLLM's page rows at head_dim 96 with 128-token tiles hold a 10560-byte record in 10624 bytes
    (`KVarNFormat.page_row_bytes`): the kernel and the CPU backend read the records through the row stride."""
    state = _state([3 * 128 + 5, 130], 1, 96, torch.float16, device, "kvarn_k4v2_g128")
    fmt = state.fmt
    rows = torch.full((*state.cache.shape[:2], fmt.page_row_bytes), 0xFF, dtype=torch.uint8, device=device)
    rows[..., : fmt.record_bytes] = state.cache
    wide = dataclasses.replace(state, cache=rows[..., : fmt.record_bytes])
    q = torch.randn(2, 4, 96, generator=torch.Generator().manual_seed(8)).to(device, torch.float16)
    cu = _cu([1, 1], device)
    assert torch.equal(decode_attention(q, wide, num_splits=2), decode_attention(q, state, num_splits=2))
    assert torch.equal(ref.paged_attention_ref(q, wide, cu), ref.paged_attention_ref(q, state, cu))


def test_decode_splits_fill_one_wave_of_resident_programs():
    assert choose_num_splits(1, 8, 130, 132, per_sm=2) == 32  # 264 slots / 8 programs per split = 33 -> 32
    assert choose_num_splits(32, 8, 130, 132, per_sm=2) == 1  # 256 programs already fill the 264 slots
    assert choose_num_splits(8, 8, 130, 132, per_sm=4) == 8
    assert choose_num_splits(8, 8, 130, 132, per_sm=1) == 2
    assert choose_num_splits(32, 8, 130, 132) == 2  # chunks: at least twice the SMs, rounded up


def test_one_tile_decodes_take_the_splits_that_shorten_the_longest_walk():
    # batch 1 x 16K (133 units), 8 programs per split, 3 x 132 slots: 32 splits walk 5 units, 48 walk 3.
    assert one_tile_splits(8, 133, 396) == 48
    assert one_tile_splits(64, 37, 396) == 6  # batch 8 x 4K: 7 units each, not 10 with 4 splits
    assert one_tile_splits(8, 13, 396) == 16  # one unit each: the fewest splits that give that (12 leave 2)
    assert one_tile_splits(256, 21, 396) == 1  # a wave is full already
    assert one_tile_splits(1000, 21, 396) == 1  # more programs than slots: still one split
    for programs, units, slots in [(8, 1000, 396), (24, 77, 396), (3, 5, 100), (16, 130, 264)]:
        s = one_tile_splits(programs, units, slots)
        fits = [c for c in attention.TUNING.one_tile_splits if c * programs <= slots]
        assert s in fits and all(-(-units // c) >= -(-units // s) for c in fits)
    # split_plan: one tile at a time where a split gets few units (head_dim 128), else row groups at a power of two.
    assert split_plan(1, 8, 127, 128, 4, torch.bfloat16, 132) == (48, 1)
    assert split_plan(8, 8, 31, 128, 4, torch.bfloat16, 132) == (6, 1)
    assert split_plan(1, 8, 511, 128, 4, torch.bfloat16, 132) == (32, 4)
    assert split_plan(8, 8, 127, 128, 4, torch.bfloat16, 132) == (4, 4)
    assert split_plan(1, 8, 127, 256, 4, torch.bfloat16, 132) == (16, 1)  # head_dim 256: powers of two
    # head_dim 96 (128 wide): one wave of 2 programs per SM, powers of two (no one-tile rule measured for it).
    assert split_plan(1, 8, 127, 96, 4, torch.bfloat16, 132) == (32, 1)
    assert split_plan(1, 8, 127, 128, 4, torch.bfloat16, 132, num_splits=64) == (64, 1)  # forced: kept
    assert split_plan(1, 8, 127, 128, 8, torch.bfloat16, 132) == (48, 1)  # GQA 8: its capped build holds 3 too
    assert split_plan(1, 8, 127, 128, 6, torch.bfloat16, 132) == (48, 1)  # GQA 6 too
    assert split_plan(1, 8, 127, 128, 4, torch.float16, 132) == (48, 1)  # float16 at 128 (capped) too
    assert split_plan(1, 8, 127, 128, 4, torch.bfloat16, 132, has_new=True)[0] == 32  # the chunk build


def test_register_caps_apply_to_the_listed_one_tile_decode_split_builds_only():
    capped = {**attention.TUNING.launch_options, "maxnreg": 168}
    for n_rep in (1, 2, 3, 5, 6, 7, 8, 12, 16):
        assert attention.launch_options(16, 128, tl.bfloat16, 1, n_rep, 48, decode=True) == capped
        plain = attention.TUNING.launch_options
        assert attention.launch_options(16, 128, tl.bfloat16, 1, n_rep, 1, decode=True) == plain
        assert attention.launch_options(16, 128, tl.bfloat16, 1, n_rep, 48) == plain  # chunks
        assert attention.launch_options(16, 128, tl.float16, 1, n_rep, 48, decode=True) == capped
    assert attention.launch_options(16, 128, tl.bfloat16, 1, 4, 48, decode=True) == attention.TUNING.launch_options
    assert attention.launch_options(16, 128, tl.float16, 1, 4, 48, decode=True) == capped
    assert attention.launch_options(16, 64, tl.float16, 1, 8, 48, decode=True) == attention.TUNING.launch_options_d64
    groups = attention.TUNING.launch_options_groups
    assert attention.launch_options(16, 128, tl.bfloat16, 4, 1, 48, decode=True) == groups
    # Every capped build is also counted as holding several programs per SM (what the cap is for).
    assert set(attention.TUNING.one_tile_maxnreg) <= set(attention.TUNING.decode_programs_per_sm_one_tile)


def test_check_tables_names_bad_device_metadata(device, monkeypatch):
    """The kernels trust seq_lens and the block tables (checking them costs a device sync); PagedKV.check_tables does
    check them, and KVARN_CHECK_TABLES=1 runs it on every attention call, so a bad id raises instead of reading out of
    bounds."""
    lens = [3 * 64 + 5, 40]
    state = _state(lens, 1, 64, torch.float16, device)
    q = torch.randn(2, 2, 64, device=device).half()
    state.check_tables()
    state.check_tables(max_history=max(lens))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 197: a history length must be \[0, 100\]"):
        state.check_tables(max_history=100)
    bad = dataclasses.replace(state, block_table=state.block_table.clone())
    bad.block_table[0, 1] = state.cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = \d+: tile 1 of sequence 0 must be a block"):
        bad.check_tables()
    bad.block_table[0, 1] = 0
    bad.block_table[1, 0] = -5  # sequence 1 has no quantized tile: an unused entry is not checked
    bad.check_tables()
    narrow = dataclasses.replace(state, block_table=state.block_table[:, :1].contiguous())
    with pytest.raises(ValueError, match="has 2 quantized tiles but its block_table row holds 1"):
        narrow.check_tables()
    for col, name in ((0, "sink"), (1, "tail")):
        dense = dataclasses.replace(state, dense_table=state.dense_table.clone())
        dense.dense_table[0, col] = 99
        with pytest.raises(ValueError, match=rf"dense_table\[0, {col}\] = 99: sequence 0's {name} block"):
            dense.check_tables()
    negative = dataclasses.replace(state, seq_lens=torch.tensor([-1, 40], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = -1"):
        negative.check_tables()
    bad.block_table[0, 1] = state.cache.shape[0]
    monkeypatch.setenv("KVARN_CHECK_TABLES", "1")
    with pytest.raises(ValueError, match="must be a block of the cache"):
        decode_attention(q, bad)
    decode_attention(q, state)  # good tables pass


def test_tile_groups_fill_the_padding_rows_only():
    assert tile_groups(16, 4, 1, 100) == 4  # 4 copies of a GQA-4 group
    assert tile_groups(16, 8, 1, 100) == 1  # only 2 copies of a GQA-8 group fit: not grouped
    assert tile_groups(16, 3, 1, 100) == 4  # padded to 4 rows per group
    assert tile_groups(16, 16, 1, 100) == 1
    assert tile_groups(16, 4, 1, attention.TUNING.group_min_units - 1) == 1  # short splits: one tile at a time
    assert tile_groups(64, 4, 16, 100) == 1  # chunks fill their rows with queries
    assert tile_groups(16, 4, 1, 100, torch.float32) == 1


@pytest.mark.parametrize("splits,head_dim", [(1, 64), (2, 64), (2, 96)])
def test_chunk_matches_reference(splits, head_dim, device):
    hist = [0, 10, 64 + 7, 3 * 64]
    n_q = [5, 3, 17, 1]
    n_k = [5, 4, 17, 1]  # the second sequence re-feeds one already-seen token (prefix-hit style)
    state = _state(hist, 2, head_dim, torch.float16, device)
    q = torch.randn(sum(n_q), 6, head_dim, device=device).half()
    k_new = torch.randn(sum(n_k), 2, head_dim, device=device).half()
    v_new = torch.randn(sum(n_k), 2, head_dim, device=device).half()
    cu_q, cu_k = _cu(n_q, device), _cu(n_k, device)
    expected = ref.paged_attention_ref(q, state, cu_q, k_new, v_new, cu_k)
    actual = chunk_attention(q, k_new, v_new, cu_q, cu_k, max(n_q), state, num_splits=splits)
    torch.testing.assert_close(actual.float(), expected.float(), atol=8e-3, rtol=0)


@given(
    lens=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    n_rep=st.sampled_from([1, 2, 3]),
    splits=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=8, deadline=None)
def test_decode_random_shapes(lens, n_rep, splits, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = _state(lens, 1, 64, torch.float32, device, seed=seed)
    q = torch.randn(len(lens), n_rep, 64, generator=torch.Generator().manual_seed(seed)).to(device)
    expected = ref.paged_attention_ref(q, state, _cu([1] * len(lens), device))
    torch.testing.assert_close(decode_attention(q, state, num_splits=splits), expected, atol=5e-3, rtol=0)


def test_nan_in_one_sequence_does_not_reach_another(device):
    state = _state([200, 200], 1, 64, torch.float16, device)
    block = int(state.block_table[0, 0])
    codes, scales = state.fmt.split(state.cache)
    scales[block, 0, 0] = float("nan")
    state.sink_v[1, 0, 3, 5] = float("inf")  # and an Inf in the other sequence's 16-bit sink
    q = torch.randn(2, 2, 64, device=device).half()
    expected = ref.paged_attention_ref(q, state, _cu([1, 1], device))
    actual = decode_attention(q, state, num_splits=2)
    assert torch.isnan(actual[0]).all() and torch.isnan(expected[0]).all()
    assert not torch.isfinite(actual[1]).all()
    state.sink_v[1, 0, 3, 5] = 0.0
    clean = decode_attention(q, state, num_splits=2)
    assert torch.isfinite(clean[1]).all()


def test_choose_num_splits_is_a_power_of_two_within_limits():
    assert choose_num_splits(1, 8, 1024, 132) == 32
    assert choose_num_splits(64, 8, 1024, 132) == 1
    assert choose_num_splits(1, 8, 3, 132) == 4
    assert choose_num_splits(1, 8, 7, 132) == 8
    assert choose_num_splits(1, 8, 0, 132) == 1
    for args in [(1, 1, 10**6, 132), (3, 5, 77, 132)]:
        s = choose_num_splits(*args)
        assert s & (s - 1) == 0 and 1 <= s <= 64


def test_wrong_query_shape_is_refused(device):
    state = _state([10], 2, 64, torch.float16, device)
    with pytest.raises(ValueError, match=r"q must be \[T, Hq, 64\]"):
        decode_attention(torch.zeros(1, 4, 128, device=device).half(), state)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        decode_attention(torch.zeros(1, 3, 64, device=device).half(), state)


def test_mismatched_state_is_refused(device):
    state = _state([10], 2, 64, torch.float16, device)
    state.dense_table = state.dense_table.long()
    with pytest.raises(ValueError, match="dense_table must be int32"):
        decode_attention(torch.zeros(1, 4, 64, device=device).half(), state)


@pytest.mark.parametrize("preset,head_dim", [("kvarn_k4v2_g64", 64), ("kvarn_k4v4_g128", 64), ("kvarn_k2v2_g128", 64),
                                             ("kvarn_k4v2_g64", 96)])
def test_magic_code_conversion_path_matches_reference(preset, head_dim, monkeypatch, device):
    """The GPU path ORs codes into a float16's mantissa (1024 + code) and removes the offset algebraically;
    force it here with float16 dots (exact under the interpreter, unlike its bfloat16 dots)."""
    import triton.language as tl

    from kvarn_kernels import attention

    monkeypatch.setattr(attention, "_dot_dtype", lambda dtype: tl.float16)
    tuning = dataclasses.replace(attention.TUNING, magic_dtypes=frozenset({tl.float16, tl.bfloat16}))
    fmt = KVarNFormat.from_preset(preset, head_dim, torch.float16)
    kv = [synthetic_kv(n, 2, head_dim, torch.float16, seed=i, device=device) for i, n in enumerate([300, 70])]
    gen = torch.Generator().manual_seed(0)
    state = build_paged_kv([k for k, _ in kv], [v for _, v in kv], fmt, ref.quantize_into_cache_ref, 2, gen)
    q = torch.randn(2, 8, head_dim, device=device).half()
    expected = ref.paged_attention_ref(q, state, _cu([1, 1], device))
    actual = decode_attention(q, state, num_splits=2, tuning=tuning)
    # Exact products under the interpreter; a GPU's tensor cores accumulate the offset operands (1024 + code)
    # before the offset is removed, which costs a few more low bits (measured on an H100: 0.012 at one element).
    atol = 8e-3 if device == "cpu" else 1.6e-2
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=2**-10)


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dot", ["bfloat16", "float16"])
def test_ptx_unpack_gives_every_code_of_every_plane(dot, bits, weighted):
    """The packed-register PTX unpacks against integer arithmetic, every code value. bfloat16 (offset removed
    algebraically): 128 + code, but for values (weighted) 128 + 4^p·code for 2-bit planes 0-2 (masked in place;
    `_v_operand` divides by the same weight). float16 (offset subtracted in registers): the code itself, exactly."""
    import triton
    import triton.language as tl

    from kvarn_kernels.attention import BF16_MAGIC_ASM, F16_SUB_ASM, _plane

    @triton.jit
    def unpack_kernel(words_ptr, out_ptr, BITS: tl.constexpr, R: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr,
                      MAGIC: tl.constexpr, WEIGHTED: tl.constexpr):
        offs = tl.arange(0, R)[:, None] * W + tl.arange(0, W)[None, :]
        words = tl.load(words_ptr + offs)
        for plane in tl.static_range(4):
            tl.store(out_ptr + plane * R * W + offs, _plane(words, plane, BITS, DOT, MAGIC, WEIGHTED))

    r, w = 64, 32
    gen = torch.Generator().manual_seed(0)
    wdtype = torch.int16 if bits == 4 else torch.uint8
    words = torch.randint(0, 2 ** (4 * bits), (r, w), generator=gen).to(torch.int32).to(wdtype).cuda()
    out = torch.empty(4, r, w, dtype=getattr(torch, dot), device="cuda")
    magic = BF16_MAGIC_ASM if dot == "bfloat16" else F16_SUB_ASM
    unpack_kernel[(1,)](words, out, BITS=bits, R=r, W=w, DOT=getattr(tl, dot), MAGIC=magic, WEIGHTED=weighted)
    as_int = words.to(torch.int32) & (2 ** (4 * bits) - 1)
    codes = torch.stack([(as_int >> (p * bits)) & (2**bits - 1) for p in range(4)])
    assert set(codes.unique().tolist()) == set(range(2**bits))  # every code value is checked
    if dot == "bfloat16":
        weights = torch.tensor((1, 4, 16, 1) if bits == 2 and weighted else (1, 1, 1, 1), device="cuda")[:, None, None]
        expected = 128 + weights * codes
    else:
        expected = codes
    assert torch.equal(out.float(), expected.float())


def test_code_conversion_avoids_ptx_on_rocm(monkeypatch):
    import triton.language as tl

    from kvarn_kernels.attention import BF16_MAGIC_ASM, F16_SUB_ASM, code_conversion

    assert code_conversion(tl.bfloat16) == (BF16_MAGIC_ASM.value, 128.0)  # the PTX unpack on NVIDIA GPUs
    assert code_conversion(tl.float16) == (F16_SUB_ASM.value, 0.0)  # offset removed before the dot
    assert code_conversion(tl.float16, 64) == (F16_SUB_ASM.value, 0.0)
    assert code_conversion(tl.float16, 256) == (0, 0.0)  # head_dim 256: plain conversion
    assert code_conversion(tl.float32) == (0, 0.0)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert code_conversion(tl.bfloat16) == (0, 0.0)
    assert code_conversion(tl.float16) == (0, 0.0)


def test_max_history_bounds_splits_without_changing_results(device):
    """A front-end may reserve block-table columns ahead; max_history sizes the split scratch by the real history."""
    hist, n_q = [3 * 64 + 5, 64 + 1], [4, 2]
    state = _state(hist, 2, 64, torch.float16, device)
    wide = torch.zeros(len(hist), 40, dtype=torch.int32, device=device)
    wide[:, : state.block_table.shape[1]] = state.block_table
    state.block_table = wide
    q = torch.randn(sum(n_q), 4, 64, device=device).half()
    kv_new = torch.randn(sum(n_q), 2, 64, device=device).half()
    cu = _cu(n_q, device)
    expected = ref.paged_attention_ref(q, state, cu, kv_new, kv_new, cu)
    actual = chunk_attention(q, kv_new, kv_new, cu, cu, max(n_q), state)
    bounded = paged_attention(q, state, cu, max(n_q), kv_new, kv_new, cu, max_history=max(hist))
    torch.testing.assert_close(actual.float(), expected.float(), atol=8e-3, rtol=2**-10)
    torch.testing.assert_close(bounded.float(), expected.float(), atol=8e-3, rtol=2**-10)


def test_query_blocks_count_toward_occupancy():
    assert choose_num_splits(1, 2, 255, 132, q_blocks=4096) == 1
    assert choose_num_splits(1, 2, 255, 132, q_blocks=1) == 64


@pytest.mark.parametrize("head_dim", [64, 96])
def test_self_check_passes_and_catches_a_broken_kernel(head_dim, monkeypatch, device):
    from kvarn_kernels import ops

    fmt = KVarNFormat.from_preset("kvarn_k4v2_g64", head_dim, torch.float32)
    monkeypatch.setattr(ops, "_CHECKED", set())
    ops.self_check(fmt, torch.float32, device)  # the kernels (interpreted on a CPU) agree with the reference
    assert len(ops._CHECKED) == 1
    monkeypatch.setattr(ops, "_CHECKED", set())
    monkeypatch.setattr(ops.attention, "decode_attention", lambda q, state: torch.zeros_like(q))
    with pytest.raises(RuntimeError, match="self-check failed.*attention differs"):
        ops.self_check(fmt, torch.float32, device)


def test_sixteen_bit_decode_is_the_reference_at_float32_and_close_at_bfloat16():
    """The GPU tests' precision floor: at float32 nothing is rounded, so it is the reference itself."""
    state = _state([5, 200, 300], 2, 64, torch.float32, "cpu")
    q = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(0))
    expected = ref.paged_attention_ref(q, state, _cu([1, 1, 1], "cpu")).float()
    torch.testing.assert_close(sixteen_bit_decode(q, state), expected, atol=1e-5, rtol=1e-5)
    qb = q.bfloat16()
    floor = sixteen_bit_decode(qb, state) - ref.paged_attention_ref(qb, state, _cu([1, 1, 1], "cpu")).float()
    assert 1e-4 < floor.abs().mean() < 5e-3  # bfloat16 keeps 8 bits; the GPU tests measured ~1e-3
