"""Decode time per (tile groups, splits) at fixed shapes: the data behind `attention.tile_groups` and
`attention.choose_num_splits`.

    PYTHONPATH=. python benchmarks/kernels/sweep_groups.py --out \
        benchmarks/kernels/results/sweep_groups/h100/2026-11-24_4fcea14.json
    PYTHONPATH=. python benchmarks/kernels/sweep_groups.py --evaluate \
        benchmarks/kernels/results/sweep_groups/h100/2026-11-24_4fcea14.json
(--evaluate needs no GPU; tests/benchmarks/test_sweep_groups.py runs it.) A sweep split by --dims into several runs
is joined by concatenating the runs' "rows".

For each shape (batch, context, head_dim; 32 query / 8 KV heads, k4v2_g128, bfloat16) every tile-group count in
--groups is timed at every power-of-two split count up to 64 (one tile at a time, where the rule takes them, also at
3 * 2^k; CUDA-graph replays, median), and at the automatic choice. One JSON line per shape with the automatic
choice's time and the best (groups, splits).

--evaluate replays the current rule (`attention.choose_num_splits` + `attention.tile_groups`, as `paged_attention`
calls them) over a stored sweep: the time of the (groups, splits) it picks per shape against that shape's best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


def evaluate(path: Path, num_sms: int = 132, group: int = 128) -> float:
    """Geometric-mean ratio of the current rule's pick (`attention.split_plan`, as `paged_attention` calls it) to
    each shape's best over the sweep at `path` (printed per shape). Shapes as `bench_decode.make_state` builds them:
    (context − G) // G tiles; 32 query / 8 KV heads, bfloat16."""
    rows = json.loads(path.read_text())["rows"]
    logs = []
    for r in rows:
        splits, tg = attention.split_plan(r["batch"], 8, (r["ctx"] - group) // group, r["d"], 4, torch.bfloat16,
                                          num_sms)
        key = f"{tg}/{splits}"
        us = r["us"].get(key)
        if us is None:
            print(f"batch {r['batch']} x {r['ctx']} d{r['d']}: pick {key} was not timed")
            continue
        logs.append(math.log(us / r["best_us"]))
        print(f"batch {r['batch']:>2} x {r['ctx']:>6} d{r['d']:<3}: pick {key:<5} {us:8.1f} us, best {r['best']:<5} "
              f"{r['best_us']:8.1f} us ({us / r['best_us']:.2f}x)")
    geo = math.exp(sum(logs) / len(logs))
    print(f"geometric mean {geo:.3f}x of the best, worst {math.exp(max(logs)):.2f}x")
    return geo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--groups", default="1,4")
    ap.add_argument("--dims", default="64,128,256", help="only the shapes of these head dims (split a long sweep)")
    ap.add_argument("--evaluate", type=Path, help="replay the current rule over a stored sweep (no GPU)")
    args = ap.parse_args()
    if args.evaluate:
        evaluate(args.evaluate)
        return
    if args.out is None:
        ap.error("--out is required to run a sweep")
    groups = [int(g) for g in args.groups.split(",")]
    dtype = torch.bfloat16
    rows = []
    dims = {int(x) for x in args.dims.split(",")}
    for batch, ctx, d in tqdm([s for s in SHAPES if s[2] in dims], desc="shapes"):
        fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", d, dtype)
        state = make_state(batch, ctx, 8, fmt, dtype)
        q = torch.randn(batch, 32, d, device="cuda", dtype=dtype)
        row: dict = {"batch": batch, "ctx": ctx, "d": d, "us": {}}
        row["auto_us"] = round(1e3 * graph_time_ms(lambda st=state: decode_attention(q, st)), 1)
        for tg in groups:
            tuning = dataclasses.replace(attention.TUNING, max_tile_groups=tg)
            # One tile at a time, head dims whose split rule also takes 3 * 2^k splits (`attention.one_tile_splits`).
            one_tile = attention.TUNING.decode_programs_per_sm_one_tile
            extra = (3, 6, 12, 24, 48) if tg == 1 and (d, dtype, 4) in one_tile else ()
            for splits in sorted((1, 2, 4, 8, 16, 32, 64) + extra):
                if batch * 8 * splits > 8 * 132 * 8:  # far past filling the GPU
                    continue
                row["us"][f"{tg}/{splits}"] = round(
                    1e3 * graph_time_ms(lambda s=splits, st=state, t=tuning: decode_attention(q, st, num_splits=s,
                                                                                              tuning=t)), 1)
        add_row(rows, row)
        state = None
        torch.cuda.empty_cache()
    write_rows(args.out, rows)


def add_row(rows: list[dict], row: dict) -> None:
    """Mark a shape's best timing, print its line and keep it."""
    best = min(row["us"], key=row["us"].get)
    row["best"], row["best_us"] = best, row["us"][best]
    print(json.dumps(row), flush=True)
    rows.append(row)


def write_rows(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
