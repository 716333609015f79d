"""Run-to-run spread of large decodes: rested GPU versus right after a flash SDPA run at the same shape.

    PYTHONPATH=. python benchmarks/kernels/diagnostics/variance_probe.py

Per shape: six timings on fresh states (rested), one flash SDPA timing on 16-bit KV, then a decode timed at once and
again after 2 idle seconds. The evidence behind `bench_decode.COOLDOWN_S`
(results/variance_probe/h100/2026-11-24_4fcea14.log).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from benchmarks.kernels.bench_decode import graph_time_ms, make_state
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat


def main() -> None:
    dtype = torch.bfloat16
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, dtype)
    for batch, ctx in [(32, 16384), (32, 65536), (64, 65536)]:
        out: dict = {"batch": batch, "ctx": ctx, "fresh": [], "after_sdpa": [], "sdpa": []}
        for _ in range(3):
            state = make_state(batch, ctx, 8, fmt, dtype)
            q = torch.randn(batch, 32, 128, device="cuda", dtype=dtype)
            for _ in range(2):
                out["fresh"].append(round(1e3 * graph_time_ms(lambda st=state, q=q: decode_attention(q, st)), 1))
            state = None
            torch.cuda.empty_cache()
        qs = torch.randn(batch, 32, 1, 128, device="cuda", dtype=dtype)
        k = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=dtype)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            ms = graph_time_ms(lambda k=k: F.scaled_dot_product_attention(qs, k, k, enable_gqa=True))
        out["sdpa"].append(round(1e3 * ms, 1))
        k = None
        torch.cuda.empty_cache()
        state = make_state(batch, ctx, 8, fmt, dtype)
        q = torch.randn(batch, 32, 128, device="cuda", dtype=dtype)
        out["after_sdpa"].append(round(1e3 * graph_time_ms(lambda st=state, q=q: decode_attention(q, st)), 1))
        time.sleep(2)
        out["after_sdpa"].append(round(1e3 * graph_time_ms(lambda st=state, q=q: decode_attention(q, st)), 1))
        print(json.dumps(out), flush=True)
        state = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
