"""Time the prefill quantize kernel under launch-option overrides (`quantize_into_cache(...,
launch_overrides=...)`), on a GPU.

    python benchmarks/kernels/ab/quantize_launch_ab.py '[["default", {}], ["w8r128", {"num_warps": 8, "maxnreg": 128}]]'
        [--shapes kvarn_k4v2_g128:128,kvarn_k4v2_g128:64] [--tokens 16384]

One JSON line per (shape, config): milliseconds per `quantize_into_cache` call over --tokens tokens of 8 KV heads
(bfloat16, CUDA-graph median, as `bench_decode.py --prefill-only`), and how many cache bytes differ from the first
config's output (other warp counts reduce in another order). "maxnreg": null lifts the default register cap.
Results of 2026-11-24 (a711b0a): benchmarks/kernels/results/ab/h100/2026-11-24_a711b0a_quantize_launch_options.log.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.kernels.bench_decode import graph_time_ms
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", help='JSON list of [name, overrides] pairs; {} is the default launch')
    ap.add_argument("--shapes", default="kvarn_k4v2_g128:128,kvarn_k4v2_g128:64,kvarn_k4v2_g64:128,kvarn_k4v2_g128:256")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    configs = json.loads(args.configs)
    for shape in args.shapes.split(","):
        preset, d = shape.split(":")
        fmt = KVarNFormat.from_preset(preset, int(d), torch.bfloat16)
        src = torch.randn(args.tokens, 8, fmt.head_dim, device="cuda", dtype=torch.bfloat16)
        n = args.tokens // fmt.group
        starts = torch.arange(n, device="cuda", dtype=torch.int32) * fmt.group
        first = None
        for name, overrides in configs:
            cache = fmt.allocate(n, 8, "cuda")
            row: dict = {"preset": preset, "d": fmt.head_dim, "tokens": args.tokens, "cfg": name}
            try:
                blocks = starts // fmt.group
                ms = graph_time_ms(lambda c=cache, o=overrides: quantize_into_cache(src, src, starts, blocks, c, fmt,
                                                                                    launch_overrides=o))
                row["ms"] = round(ms, 4)
            except Exception as e:  # e.g. ptxas: too few registers for a cap
                row["error"] = str(e)[:200]
            else:
                first = cache if first is None else first
                row["bytes_differ_vs_first"] = int((cache != first).sum())
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
