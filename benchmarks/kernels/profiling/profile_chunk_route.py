"""Per-kernel GPU times of the large-chunk route (history dequantized once + varlen flash), forced for every size.

    PYTHONPATH=. python benchmarks/kernels/profiling/profile_chunk_route.py

torch.profiler over 10 calls at a 16K-token history (batch 1, 32 query / 8 KV heads, head_dim 128, k4v2_g128,
bf16) for chunks of 4, 64 and 512 queries; prints microseconds per call by kernel. 2026-11-23 (58f1ce6) (H100): the
dequantize
kernel ~96 us and torch's varlen flash kernel ~490 us at every size
(benchmarks/kernels/results/gpu_tests/h100/2026-11-23_58f1ce6.log).
"""

import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.kernels.bench_decode import make_state
from kvarn_kernels import attention
from kvarn_kernels.attention import paged_attention
from kvarn_kernels.format import KVarNFormat


def main() -> None:
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, torch.bfloat16)
    state = make_state(1, 16384, 8, fmt, torch.bfloat16)
    tuning = dataclasses.replace(attention.TUNING, dense_chunk_min_queries=1)  # the dequantize-once route always
    for n in (4, 64, 512):
        q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
        kn = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, n], device="cuda", dtype=torch.int32)
        for _ in range(3):
            paged_attention(q, state, cu, n, kn, kn, cu, tuning=tuning)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                paged_attention(q, state, cu, n, kn, kn, cu, tuning=tuning)
            torch.cuda.synchronize()
        per: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name[:40]] = per.get(e.name[:40], 0.0) + e.device_time_total / 10
        print(n, {k: round(v, 1) for k, v in per.items()}, flush=True)


if __name__ == "__main__":
    main()
