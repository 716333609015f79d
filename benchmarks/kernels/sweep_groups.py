"""Decode time per (tile groups, splits) at fixed shapes: the data behind `attention.tile_groups` and
`attention.choose_num_splits`.

    python benchmarks/kernels/sweep_groups.py --out benchmarks/kernels/results/sweep_groups.json

For each shape (batch, context, head_dim; 32 query / 8 KV heads, k4v2_g128, bfloat16) every tile-group count in
--groups is timed at every power-of-two split count up to 64 (CUDA-graph replays, median), and at the automatic
choice. One JSON line per shape with the automatic choice's time and the best (groups, splits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.kernels.bench_decode import graph_time_ms, make_state
from kvarn_kernels import attention
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat

SHAPES = [(1, 2048, 128), (1, 4096, 128), (1, 16384, 128), (1, 65536, 128), (1, 131072, 128), (8, 2048, 128),
          (8, 4096, 128), (8, 16384, 128), (8, 131072, 128), (32, 4096, 128), (32, 16384, 128), (64, 16384, 128),
          (1, 16384, 64), (8, 16384, 64), (64, 16384, 64), (1, 16384, 256), (8, 16384, 256), (64, 16384, 256)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--groups", default="1,4")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    dtype = torch.bfloat16
    default_groups = attention.TILE_GROUPS
    rows = []
    for batch, ctx, d in tqdm(SHAPES, desc="shapes"):
        fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", d, dtype)
        state = make_state(batch, ctx, 8, fmt, dtype)
        q = torch.randn(batch, 32, d, device="cuda", dtype=dtype)
        row: dict = {"batch": batch, "ctx": ctx, "d": d, "us": {}}
        attention.TILE_GROUPS = default_groups
        row["auto_us"] = round(1e3 * graph_time_ms(lambda st=state: decode_attention(q, st)), 1)
        for tg in groups:
            attention.TILE_GROUPS = tg
            for splits in (1, 2, 4, 8, 16, 32, 64):
                if batch * 8 * splits > 8 * 132 * 8:  # far past filling the GPU
                    continue
                row["us"][f"{tg}/{splits}"] = round(
                    1e3 * graph_time_ms(lambda s=splits, st=state: decode_attention(q, st, num_splits=s)), 1)
        attention.TILE_GROUPS = default_groups
        best = min(row["us"], key=row["us"].get)
        row["best"] = best
        row["best_us"] = row["us"][best]
        print(json.dumps(row), flush=True)
        rows.append(row)
        state = None
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
