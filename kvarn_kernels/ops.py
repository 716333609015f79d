"""Device dispatch: Triton kernels on CUDA tensors, the plain-PyTorch backend (`dense`) elsewhere (CPU).

Front-ends call these; tests and benchmarks call `attention`/`quantize` or `reference` directly to compare.
Set KVARN_FORCE_TRITON=1 to run the Triton kernels on CPU under TRITON_INTERPRET=1.

Self-check: the first time the Triton kernels serve a (device, format, dtype), they quantize and attend a small
synthetic problem and are compared with the reference; a disagreement (a Triton/driver/GPU combination that
miscompiles) raises a RuntimeError instead of silently corrupting generations. KVARN_SKIP_SELFCHECK=1 skips it.
"""

from __future__ import annotations

import torch

from . import attention, dense, quantize
from .env import force_triton, skip_self_check
from .format import KVarNFormat
from .state import PagedKV


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or force_triton()


_CHECKED: set[tuple] = set()


def self_check(fmt: KVarNFormat, dtype: torch.dtype, device: torch.device | str) -> None:
    """Compare the Triton kernels with the reference once per (device, format, dtype); raise if they disagree."""
    key = (str(torch.device(device)), fmt.preset, fmt.head_dim, fmt.scale_dtype, dtype)
    if key in _CHECKED or skip_self_check():
        return
    from . import reference
    from .reference import exact_decode, synthetic_kv
    from .state import build_paged_kv

    hkv, n_rep, lens = 2, 4, [3 * fmt.group + 5, fmt.group + 1]
    kv = [synthetic_kv(n, hkv, fmt.head_dim, dtype, seed=i, device=device) for i, n in enumerate(lens)]
    ks, vs = [k for k, _ in kv], [v for _, v in kv]
    triton_state = build_paged_kv(ks, vs, fmt, quantize.quantize_into_cache)
    ref_state = build_paged_kv(ks, vs, fmt, reference.quantize_into_cache_ref)
    q = torch.randn(len(lens), hkv * n_rep, fmt.head_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    expected = reference.paged_attention_ref(q, ref_state, cu).float()
    problems = []
    # Attention: the same packed state through the kernel and the reference (arithmetic differences only).
    got = attention.decode_attention(q, ref_state).float()
    excess = ((got - expected).abs() - 0.03 - 0.03 * expected.abs()).max().item()
    if not excess <= 0:  # NaN fails too
        problems.append(f"attention differs from the reference by {excess + 0.03:.3g} beyond tolerance")
    # Quantize: near-tie tiles may legitimately round differently, so compare accuracy against exact attention.
    exact = torch.stack([exact_decode(q[i], ks[i], vs[i]) for i in range(len(lens))])
    err_ref = (expected - exact).abs().mean().item()
    err_kernel = (reference.paged_attention_ref(q, triton_state, cu).float() - exact).abs().mean().item()
    if not err_kernel <= 1.25 * err_ref + 1e-3:
        problems.append(f"quantize: attention error {err_kernel:.3g} vs the reference quantizer's {err_ref:.3g}")
    if problems:
        raise RuntimeError(
            f"KVarN self-check failed on {device} for {fmt.preset} head_dim {fmt.head_dim} {dtype}: "
            + "; ".join(problems) + ". The Triton kernels miscompute on this GPU/Triton version; refusing to run "
            "rather than corrupt generations (set KVARN_SKIP_SELFCHECK=1 to override, and please report it)."
        )
    _CHECKED.add(key)


def quantize_into_cache(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    tile_starts: torch.Tensor,
    block_ids: torch.Tensor,
    cache: torch.Tensor,
    fmt: KVarNFormat,
    k_weights: torch.Tensor | None = None,
) -> None:
    """Quantize G-token tiles of k_src/v_src [T, H, D] starting at tile_starts into cache[block_ids]; k_weights
    [N, H, D] float32 (optional): each tile's channel weights of the K-frame choice (`codec.choose_k_rotation`)."""
    if _use_triton(cache):
        self_check(fmt, k_src.dtype, cache.device)
        quantize.quantize_into_cache(k_src, v_src, tile_starts, block_ids, cache, fmt, k_weights)
    else:
        dense.quantize_into_cache(k_src, v_src, tile_starts, block_ids, cache, fmt, k_weights)


def paged_attention(
    q: torch.Tensor,
    state: PagedKV,
    cu_seqlens_q: torch.Tensor,
    max_q_len: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    sm_scale: float | None = None,
    max_history: int | None = None,
) -> torch.Tensor:
    """Varlen attention over the paged state plus causal new tokens; see `dense.paged_attention`.

    max_history: an upper bound (host int) on every sequence's cached length, or None (the block table's width).
    """
    if _use_triton(q):
        self_check(state.fmt, q.dtype, q.device)
        return attention.paged_attention(q, state, cu_seqlens_q, max_q_len, k_new, v_new, cu_seqlens_k, sm_scale,
                                         max_history=max_history)
    return dense.paged_attention(q, state, cu_seqlens_q, k_new, v_new, cu_seqlens_k, sm_scale)
