"""Kernel-level: the speculative-decoding verify shape (2-8 new queries per sequence over 4K-32K of history).

KVarN `paged_attention` (quantized tiles + 16-bit sink/tail + the step's new tokens, causal) against vLLM's
FlashAttention 3 on an fp8 paged cache (block 16, fp8 query as vLLM quantizes it), same shapes, same run, both timed
as CUDA-graph replays (median of 5 rounds of 20). Llama-3.1-8B attention: 32 query / 8 KV heads, head_dim 128, bf16.

    python benchmarks/vllm/bench_verify_kernel.py --out benchmarks/vllm/results/verify_kernel_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvarn_kernels import KVarNFormat
from kvarn_kernels.attention import paged_attention
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.state import build_paged_kv

HQ, HKV, D = 32, 8, 128


def graph_time(fn, rounds: int = 5, reps: int = 20) -> float:
    """Median microseconds per call of fn replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def case(batch: int, hist: int, q_len: int, preset: str) -> dict:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dev, dt = "cuda", torch.bfloat16
    fmt = KVarNFormat.from_preset(preset, D, dt)
    gen = torch.Generator(device=dev).manual_seed(0)
    ks = [torch.randn(hist, HKV, D, device=dev, dtype=dt, generator=gen) for _ in range(batch)]
    vs = [torch.randn(hist, HKV, D, device=dev, dtype=dt, generator=gen) for _ in range(batch)]
    state = build_paged_kv(ks, vs, fmt, quantize_into_cache)
    q = torch.randn(batch * q_len, HQ, D, device=dev, dtype=dt, generator=gen)
    k_new = torch.randn(batch * q_len, HKV, D, device=dev, dtype=dt, generator=gen)
    v_new = torch.randn_like(k_new)
    cu = torch.arange(0, batch * q_len + 1, q_len, device=dev, dtype=torch.int32)
    kvarn_us = graph_time(lambda: paged_attention(q, state, cu, q_len, k_new, v_new, cu, max_history=hist))

    # fp8 FA3: every token (history + new) already in the paged cache, as vLLM writes it before attention.
    blk = 16
    total = hist + q_len
    nblk = (total + blk - 1) // blk
    perm = torch.randperm(batch * nblk, device=dev).to(torch.int32)
    table = perm.view(batch, nblk)
    fp8 = torch.float8_e4m3fn
    k_cache = (torch.randn(batch * nblk, blk, HKV, D, device=dev, generator=gen) * 0.5).to(fp8)
    v_cache = (torch.randn(batch * nblk, blk, HKV, D, device=dev, generator=gen) * 0.5).to(fp8)
    q8 = q.to(fp8)
    seqused = torch.full((batch,), total, device=dev, dtype=torch.int32)
    one = torch.ones(batch, HKV, device=dev)
    out = torch.empty_like(q)

    def fa3():
        flash_attn_varlen_func(q=q8, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=q_len,
                               seqused_k=seqused, max_seqlen_k=total, softmax_scale=D**-0.5, causal=True,
                               block_table=table, fa_version=3, q_descale=one, k_descale=one, v_descale=one)

    fa3_us = graph_time(fa3)
    return {"batch": batch, "history": hist, "q_len": q_len, "kvarn_us": kvarn_us, "fa3_fp8_us": fa3_us,
            "speedup_vs_fa3_fp8": fa3_us / kvarn_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--histories", default="4096,8192,16384,32768")
    ap.add_argument("--q-lens", default="2,4,8")
    ap.add_argument("--preset", default="kvarn_k4v2_g128")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for b in map(int, a.batches.split(",")):
        for h in map(int, a.histories.split(",")):
            for ql in map(int, a.q_lens.split(",")):
                r = case(b, h, ql, a.preset)
                rows.append(r)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                                       "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
