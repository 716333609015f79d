"""A/B of split decode's merge: a second launch ("off") against the in-launch merge by the last split program with
persistent ("persistent") or per-call ("zeros") arrival counters (`attention.FUSED_MERGE`). H100 only.

    PYTHONPATH=. python benchmarks/kernels/fused_merge_ab.py --out benchmarks/kernels/results/fused_merge.json

Per shape (32 query / 8 KV heads, bfloat16, kvarn_k4v2_g128): CUDA-graph median microseconds of each mode over
`--rounds` interleaved rounds, and the largest |difference| of each mode's output from the second launch's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.kernels.bench_decode import graph_time_ms, make_state
from kvarn_kernels import attention
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat

MODES = ("off", "persistent", "zeros")
SHAPES = [(1, 1024, 128), (1, 2048, 128), (1, 4096, 128), (1, 16384, 128), (1, 65536, 128), (1, 131072, 128),
          (8, 1024, 128), (8, 2048, 128), (8, 4096, 128), (8, 16384, 128), (8, 65536, 128), (8, 131072, 128),
          (32, 1024, 128), (1, 16384, 64), (8, 16384, 64), (1, 16384, 256), (8, 16384, 256)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for batch, ctx, d in tqdm(SHAPES):
        fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", d, torch.bfloat16)
        state = make_state(batch, ctx, 8, fmt, torch.bfloat16)
        q = torch.randn(batch, 32, d, device="cuda", dtype=torch.bfloat16)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        outs = {}
        for _ in range(args.rounds):
            for mode in MODES:
                attention.FUSED_MERGE = mode
                outs[mode] = decode_attention(q, state).float()
                times[mode].append(graph_time_ms(lambda: decode_attention(q, state)) * 1e3)
        splits, groups = attention.split_plan(batch, 8, state.max_tiles(), d, 4, torch.bfloat16,
                                              attention._num_sms(q.device))
        row = {"batch": batch, "context": ctx, "head_dim": d, "splits": splits, "tile_groups": groups,
               "us": {m: round(sorted(t)[len(t) // 2], 2) for m, t in times.items()},
               "us_all": {m: [round(x, 2) for x in t] for m, t in times.items()},
               "max_abs_diff_vs_off": {m: float((outs[m] - outs["off"]).abs().max()) for m in MODES[1:]}}
        rows.append(row)
        tqdm.write(json.dumps(row))
        state = None
        torch.cuda.empty_cache()
    attention.FUSED_MERGE = "persistent"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "code": rev or "unknown",
                                    "command": "PYTHONPATH=. python benchmarks/kernels/fused_merge_ab.py --out "
                                               + str(args.out), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
