"""The dense-history kernel (history dequantized once + new tokens, packed varlen) versus the reference, and the
large-chunk route of `paged_attention` that feeds it to varlen flash attention (GPU)."""

import dataclasses

import pytest
import torch

from kvarn_kernels import attention
from kvarn_kernels import reference as ref
from kvarn_kernels.attention import paged_attention
from kvarn_kernels.dense_history import dense_history
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.reference import sixteen_bit_chunk, synthetic_kv
from kvarn_kernels.state import build_paged_kv


def _state(lens, hkv, head_dim, dtype, device, preset="kvarn_k4v2_g64"):
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    kv = [synthetic_kv(n, hkv, head_dim, dtype, seed=i, device=device) for i, n in enumerate(lens)]
    gen = torch.Generator().manual_seed(0)
    return build_paged_kv([k for k, _ in kv], [v for _, v in kv], fmt, ref.quantize_into_cache_ref, 2, gen)


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _expected(state, k_new, v_new, cu_k):
    """Per sequence: reference history [L, H, D] then its new tokens, float32."""
    out_k, out_v = [], []
    for b in range(state.batch_size):
        k, v = ref.gather_history(state, b)
        k0, k1 = int(cu_k[b]), int(cu_k[b + 1])
        out_k.append(torch.cat([k.transpose(0, 1), k_new[k0:k1].float()]))
        out_v.append(torch.cat([v.transpose(0, 1), v_new[k0:k1].float()]))
    return out_k, out_v


@pytest.mark.parametrize("dtype,out_dtype,head_dim,preset", [
    (torch.float32, torch.float32, 64, "kvarn_k4v2_g64"),
    (torch.bfloat16, torch.bfloat16, 128, "kvarn_k4v4_g64"),
    (torch.float16, torch.float16, 64, "kvarn_k2v2_g128"),
    (torch.float32, torch.float32, 96, "kvarn_k4v2_g64"),  # head_dim 96: 128 wide in registers, padding masked
])
def test_dense_history_matches_the_reference(dtype, out_dtype, head_dim, preset, device):
    """Sink only, exact tile edges, tails, several tiles (both K frames occur in synthetic data), new tokens beyond
    one tile, a sequence without new tokens; rows come back packed at cu_seqlens."""
    g = KVarNFormat.from_preset(preset, head_dim, dtype).group
    lens = [5, g, g + 3, 4 * g + 17, 2 * g]
    n_new = [3, 0, g + 9, 1, 2]
    state = _state(lens, 2, head_dim, dtype, device, preset)
    gen = torch.Generator().manual_seed(1)
    k_new = torch.randn(sum(n_new), 2, head_dim, generator=gen).to(device, dtype)
    v_new = torch.randn(sum(n_new), 2, head_dim, generator=gen).to(device, dtype)
    cu_k = _cu(n_new, device)
    k, v, cu, max_k = dense_history(state, out_dtype, k_new, v_new, cu_k)
    total = [a + b for a, b in zip(lens, n_new, strict=True)]
    assert k.dtype == out_dtype and cu.tolist() == _cu(total, "cpu").tolist() and max_k >= max(total)
    flags = ref.dequantize_records(state.cache, state.fmt)[2]
    assert flags.any() and not flags.all()  # both K frames are exercised
    want_k, want_v = _expected(state, k_new, v_new, cu_k)
    # 16-bit outputs: one step of the output dtype (the interpreter's float->bfloat16 cast truncates: a full step,
    # not half), plus, on a GPU, the exact-to-16-bits un-rotation (bf16 hi + lo parts): an absolute error of a few
    # 2^-16 of the tile's largest values, large relative to values near zero. float32: summation order only.
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[out_dtype]
    for b in range(len(lens)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        for got, want in ((k[rows].float(), want_k[b]), (v[rows].float(), want_v[b])):
            atol = 1e-5 if out_dtype == torch.float32 else 2**-12 * float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_dense_history_without_new_tokens(device):
    state = _state([300, 70], 1, 64, torch.float32, device)
    k, v, cu, _ = dense_history(state, torch.float32)
    assert cu.tolist() == [0, 300, 370]
    for b in range(2):
        want_k, want_v = ref.gather_history(state, b)
        torch.testing.assert_close(k[int(cu[b]):int(cu[b + 1])], want_k.transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[int(cu[b]):int(cu[b + 1])], want_v.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_chunks_take_the_dense_route_and_match(head_dim, dtype, monkeypatch):
    """Chunks of >= `Tuning.dense_chunk_min_queries` queries: dequantize once + varlen flash attention, against the
    reference and against the packed-tile path (the same call with the route switched off)."""
    calls = []
    real = attention._attend_dense_chunk
    monkeypatch.setattr(attention, "_attend_dense_chunk", lambda *a: calls.append(1) or real(*a))
    preset = "kvarn_k4v2_g128"
    lens = [0, 1000, 128 * 5, 3000]
    n_q = [300, 256, 520, 257]
    n_k = [300, 257, 520, 257]  # one sequence re-feeds an already-seen token (prefix-hit style)
    state = _state(lens, 2, head_dim, dtype, "cuda", preset)
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(sum(n_q), 8, head_dim, device="cuda", generator=gen).to(dtype)
    k_new = torch.randn(sum(n_k), 2, head_dim, device="cuda", generator=gen).to(dtype)
    v_new = torch.randn(sum(n_k), 2, head_dim, device="cuda", generator=gen).to(dtype)
    cu_q, cu_k = _cu(n_q, "cuda"), _cu(n_k, "cuda")
    got = paged_attention(q, state, cu_q, max(n_q), k_new, v_new, cu_k)
    assert calls
    expected = ref.paged_attention_ref(q, state, cu_q, k_new, v_new, cu_k).float()
    packed = paged_attention(q, state, cu_q, max(n_q), k_new, v_new, cu_k,
                             tuning=dataclasses.replace(attention.TUNING, dense_chunks=False)).float()
    assert len(calls) == 1
    # The route is a 16-bit flash attention over the dequantized history: judged against that computation's
    # precision floor (keys, values and probabilities in 16 bits), like the decode kernel's GPU tests.
    floor = (sixteen_bit_chunk(q, state, cu_q, k_new, v_new, cu_k) - expected).abs().max().item()
    err = (got.float() - expected).abs().max().item()
    err_packed = (packed - expected).abs().max().item()
    assert err <= max(1e-2, 2 * floor), (err, floor, err_packed)


def test_sixteen_bit_chunk_floor_is_the_reference_in_float32(device):
    """The precision floor helper computes the reference's attention (it only rounds to q.dtype)."""
    state = _state([0, 100, 300], 2, 64, torch.float32, device)
    gen = torch.Generator().manual_seed(3)
    n = [5, 3, 7]
    q, kn, vn = (torch.randn(15, h, 64, generator=gen).to(device) for h in (4, 2, 2))
    cu = _cu(n, device)
    torch.testing.assert_close(sixteen_bit_chunk(q, state, cu, kn, vn, cu),
                               ref.paged_attention_ref(q, state, cu, kn, vn, cu), rtol=1e-5, atol=1e-5)
