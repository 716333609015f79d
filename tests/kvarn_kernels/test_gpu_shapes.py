"""Kernels versus the reference at real shapes (GPU only): head_dim 64/96/128/256, GQA 1/4/8, contexts to 128K."""

import pytest
import torch

from kvarn_kernels import reference as ref
from kvarn_kernels.attention import chunk_attention, decode_attention
from kvarn_kernels.format import PRESETS, KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.reference import sixteen_bit_chunk, sixteen_bit_decode, synthetic_kv
from kvarn_kernels.state import build_paged_kv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_quantize_matches_reference(head_dim, preset):
    fmt = KVarNFormat.from_preset(preset, head_dim, torch.bfloat16)
    n, h = 64, 8
    k, v = synthetic_kv(n * fmt.group, h, head_dim, torch.bfloat16, device="cuda")
    starts = torch.arange(n, dtype=torch.int32, device="cuda") * fmt.group
    blocks = torch.randperm(n, device="cuda").to(torch.int32)
    expected, actual = fmt.allocate(n, h, "cuda"), fmt.allocate(n, h, "cuda")
    ref.quantize_into_cache_ref(k, v, starts, blocks, expected, fmt)
    quantize_into_cache(k, v, starts, blocks, actual, fmt)
    ce, _ = fmt.split(expected)
    ca, _ = fmt.split(actual)
    assert (ce != ca).float().mean().item() <= 5e-3
    ke, ve = ref.dequantize_tiles(expected, fmt)
    ka, va = ref.dequantize_tiles(actual, fmt)
    offs = (starts.long()[blocks.argsort()])[:, None] + torch.arange(fmt.group, device="cuda")
    kt, vt = k[offs].transpose(1, 2).float(), v[offs].transpose(1, 2).float()
    for hat_e, hat_a, true in ((ke, ka, kt), (ve, va, vt)):
        err_e = ((hat_e - true).norm() / true.norm()).item()
        err_a = ((hat_a - true).norm() / true.norm()).item()
        assert abs(err_a - err_e) <= 0.01 * err_e


def _decode_state(lens: list[int], hkv: int, head_dim: int):
    """A bf16 k4v2_g128 state of synthetic sequences of `lens` tokens, quantized by the Triton kernel."""
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim, torch.bfloat16)
    kv = [synthetic_kv(n, hkv, head_dim, torch.bfloat16, seed=i, device="cuda") for i, n in enumerate(lens)]
    return build_paged_kv([a for a, _ in kv], [b for _, b in kv], fmt, quantize_into_cache)


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("n_rep", [1, 4, 8])
def test_decode_matches_reference(head_dim, n_rep):
    hkv = 4
    lens = [1, 128, 129, 1000, 4096 + 77]
    state = _decode_state(lens, hkv, head_dim)
    gen = torch.Generator(device="cuda").manual_seed(100 * n_rep + head_dim)
    q = torch.randn(len(lens), hkv * n_rep, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    expected = ref.paged_attention_ref(q, state, torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda"))
    torch.testing.assert_close(decode_attention(q, state).float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_decode_is_repeatable_and_as_precise_as_16bit_attention(head_dim):
    """GQA 8 at head_dim 64 once missed atol = rtol = 2e-2 on an H100 (worst 1.01x). Measured there, FlashAttention-
    style attention over the same dequantized history with 16-bit operands misses it too (worst 1.68x): 2e-2 is
    below bfloat16's floor at outputs near 1.5. So the kernel is held to that floor instead: over 16 query draws its
    worst and mean errors must not exceed those of `reference.sixteen_bit_decode` (measured: 0.055 vs 0.126 worst,
    8e-4 vs 1.2e-3 mean). Repeated launches must give identical bits (a race would not)."""
    hkv, n_rep, lens = 4, 8, [129, 1000, 4096 + 77]
    state = _decode_state(lens, hkv, head_dim)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    errs, floors = [], []
    for _ in range(16):
        q = torch.randn(len(lens), hkv * n_rep, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        first = decode_attention(q, state)
        for _ in range(3):
            assert torch.equal(decode_attention(q, state), first)
        expected = ref.paged_attention_ref(q, state, cu).float()
        errs.append((first.float() - expected).abs())
        floors.append((sixteen_bit_decode(q, state) - expected).abs())
    err, floor = torch.stack(errs), torch.stack(floors)
    assert err.max() <= floor.max(), f"worst error {err.max():.4f} > 16-bit attention's {floor.max():.4f}"
    assert err.mean() <= floor.mean(), f"mean error {err.mean():.2e} > 16-bit attention's {floor.mean():.2e}"


@pytest.mark.parametrize("context", [32768, 131072])
def test_long_context_decode_matches_reference(context):
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, torch.bfloat16)
    k, v = synthetic_kv(context, 8, 128, torch.bfloat16, device="cuda")
    state = build_paged_kv([k], [v], fmt, quantize_into_cache)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    expected = ref.paged_attention_ref(q, state, torch.tensor([0, 1], dtype=torch.int32, device="cuda"))
    torch.testing.assert_close(decode_attention(q, state).float(), expected.float(), atol=2e-2, rtol=2e-2)


def chunk_case(head_dim: int, tuning=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks over no, short and long float16 history: (kernel output, reference output, cu_seqlens); tuning: the
    attention kernel's launch choices (default `attention.TUNING`). Also run by
    benchmarks/kernels/diagnostics/debug_chunk.py."""
    hist, n_q = [0, 300, 5000], [700, 64, 5]
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim, torch.float16)
    kv = [synthetic_kv(max(n, 1), 2, head_dim, torch.float16, seed=i, device="cuda") for i, n in enumerate(hist)]
    ks = [a[:n] for (a, _), n in zip(kv, hist, strict=True)]
    vs = [b[:n] for (_, b), n in zip(kv, hist, strict=True)]
    state = build_paged_kv(ks, vs, fmt, quantize_into_cache)
    cu = torch.tensor([0, *torch.tensor(n_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(n_q), 8, head_dim, device="cuda", dtype=torch.float16)
    kn = torch.randn(sum(n_q), 2, head_dim, device="cuda", dtype=torch.float16)
    vn = torch.randn_like(kn)
    expected = ref.paged_attention_ref(q, state, cu, kn, vn, cu)
    return chunk_attention(q, kn, vn, cu, cu, max(n_q), state, tuning=tuning), expected, cu


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_chunk_matches_reference(head_dim):
    actual, expected, _ = chunk_case(head_dim)
    torch.testing.assert_close(actual.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_decode_replays_from_a_cuda_graph():
    """Front-ends capture decode in CUDA graphs (vLLM does): a captured call replays to the eager result, bit for bit,
    and the eager path still works after the capture."""
    state = _decode_state([300, 1000], 2, 128)
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(3))
    expected = decode_attention(q, state)  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
    assert torch.equal(decode_attention(q, state), expected)


def preset_case(preset: str, dtype: torch.dtype, head_dim: int):
    """Two sequences (300 tokens; 48 tiles + 77) of `preset` quantized by the Triton kernel, 2 KV heads with GQA 4:
    (state, decode queries, their cu_seqlens, (chunk queries, new keys, new values, chunk cu_seqlens, longest chunk)).
    Also run by benchmarks/kernels/diagnostics/diag_presets.py."""
    hkv, n_rep = 2, 4
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    lens = [300, 48 * fmt.group + 77]
    kv = [synthetic_kv(n, hkv, head_dim, dtype, seed=i, device="cuda") for i, n in enumerate(lens)]
    state = build_paged_kv([a for a, _ in kv], [b for _, b in kv], fmt, quantize_into_cache)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(len(lens), hkv * n_rep, head_dim, device="cuda", dtype=dtype, generator=gen)
    n_q = [5, 3]
    cu_q = torch.tensor([0, 5, 8], dtype=torch.int32, device="cuda")
    qc = torch.randn(sum(n_q), hkv * n_rep, head_dim, device="cuda", dtype=dtype, generator=gen)
    kn = torch.randn(sum(n_q), hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    vn = torch.randn_like(kn)
    return state, q, cu, (qc, kn, vn, cu_q, max(n_q))


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_attends_like_the_reference(preset, dtype, head_dim):
    """Every preset, model dtype and head_dim through each build of the attention kernel: decode one tile at a time
    (many splits), decode in row groups (one split over 40+ tiles), and a chunk. The code unpack differs by code width
    (4-bit codes in int16 words, 2-bit codes in bytes, for keys and values alike) and by dtype (the PTX paths), so
    each combination is checked against the reference, held to the 16-bit floors of the same history
    (`reference.sixteen_bit_decode`, `sixteen_bit_chunk`). The bounds are loose multiples of them: one query draw, and
    measured on an H100 (2026-11-24, 4bb7806, results/precision/h100/2026-11-24_4bb7806_presets.log) bfloat16 decode
    at head_dim 256 erred 1.8x
    its floor, bfloat16 k2v2 1.3x, and bfloat16 g64 chunks at head_dim 64 3.6x (3-4 output steps at values near 5),
    with the plain code conversion as with the PTX path. An unpack bug is far outside them: before 2026-11-24 (4bb7806)
    bfloat16 k2v2 decode erred 7.6 against a floor of 0.015 here (key planes weighted 4^p)."""
    state, q, cu, (qc, kn, vn, cu_q, max_q) = preset_case(preset, dtype, head_dim)
    expected = ref.paged_attention_ref(q, state, cu).float()
    floor = max((sixteen_bit_decode(q, state) - expected).abs().max().item(), 4e-3)
    # The floor's outputs stay float32; the kernel's are rounded to the model dtype (half a step: 2^-9 of the value
    # in bfloat16, 2^-12 in float16), so that rounding is allowed on top.
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for splits in (16, 1):  # one tile at a time; row groups (>= 16 units per split)
        err = (decode_attention(q, state, num_splits=splits).float() - expected).abs() - rounding * expected.abs()
        assert err.max() <= 2.5 * floor, f"{splits} split(s): error {err.max():.4f} vs 16-bit floor {floor:.4f}"
    expected_c = ref.paged_attention_ref(qc, state, cu_q, kn, vn, cu_q).float()
    floor_c = max((sixteen_bit_chunk(qc, state, cu_q, kn, vn, cu_q) - expected_c).abs().max().item(), 4e-3)
    err_c = (chunk_attention(qc, kn, vn, cu_q, cu_q, max_q, state).float() - expected_c).abs()
    err_c = err_c - rounding * expected_c.abs()
    assert err_c.max() <= 5 * floor_c, f"chunk: error {err_c.max():.4f} vs 16-bit floor {floor_c:.4f}"
