"""Decode time at split counts that are not powers of two, and with more decode programs per SM.

    PYTHONPATH=. python benchmarks/kernels/sweep_splits.py --out \
        benchmarks/kernels/results/sweep_splits/h100/2026-11-24_4fcea14.json

The split rule (`attention.choose_num_splits`) picks a power of two, and a split's run of work units is rounded up
(`cdiv(units, splits)`): at batch 1 x 16K (133 units) 32 splits leave 5 of 32 idle and the rest walk 5 units each,
where 48 splits of 3 units each would fit one wave if an SM held 3 programs. This sweep times, per shape, every
(row groups, splits, register cap) of a grid that includes 3 * 2^k split counts and a 128-register cap (4 one-tile
programs per SM), so that a rule can be chosen from data. One JSON line per shape; CUDA-graph medians in us.
--q-heads sets the GQA group (query heads over 8 KV heads), --configs the (row groups/register cap) pairs timed.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.kernels.bench_decode import graph_time_ms, make_state
from benchmarks.kernels.sweep_groups import add_row, write_rows
from kvarn_kernels import attention
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat

SPLITS = {1: (16, 24, 32, 48, 64, 96), 8: (2, 3, 4, 6, 8, 12, 16), 32: (1, 2, 3), 64: (1, 2)}
SHAPES = [(1, 4096), (1, 16384), (1, 65536), (1, 131072), (8, 4096), (8, 16384), (8, 65536), (32, 16384)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--shapes", default="", help="batch:context,... (default: the module's SHAPES)")
    ap.add_argument("--q-heads", type=int, default=32, help="query heads over the 8 KV heads (GQA group = this / 8)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="the model dtype")
    ap.add_argument("--configs", default="1/0,1/128,4/0",
                    help="row groups/register cap (0: none) pairs timed at every split count")
    args = ap.parse_args()
    d = args.head_dim
    dtype = getattr(torch, args.dtype)
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", d, dtype)
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
    rows = []
    for batch, ctx in tqdm(shapes, desc="shapes"):
        state = make_state(batch, ctx, 8, fmt, dtype)
        q = torch.randn(batch, args.q_heads, d, device="cuda", dtype=dtype)
        row: dict = {"batch": batch, "ctx": ctx, "d": d, "q_heads": args.q_heads, "dtype": args.dtype, "us": {}}
        row["auto_us"] = round(1e3 * graph_time_ms(lambda st=state: decode_attention(q, st)), 1)
        for splits in SPLITS[batch]:
            for tg, cap in configs:
                # Forcing: group_min_units 0 makes every split take row groups, a huge one none; each config's
                # register cap is the only one (0: none; the auto row keeps the table's).
                tuning = dataclasses.replace(
                    attention.TUNING, group_min_units=0 if tg > 1 else 1 << 30, one_tile_maxnreg={},
                    launch_options={**attention.TUNING.launch_options, **({"maxnreg": cap} if cap else {})})
                key = f"{tg}/{splits}" + (f"/r{cap}" if cap else "")
                row["us"][key] = round(1e3 * graph_time_ms(
                    lambda s=splits, st=state, t=tuning: decode_attention(q, st, num_splits=s, tuning=t)), 1)
        add_row(rows, row)
        state = None
        torch.cuda.empty_cache()
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
