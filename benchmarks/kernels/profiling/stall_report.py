"""Summarize Nsight Compute's per-SASS-instruction stall samples: where a kernel's warps wait, by reason and opcode.

    ncu --section WarpStateStats --section SourceCounters --import-source no -k regex:KERNEL -c 1 --export F \
        python benchmarks/kernels/profiling/profile_decode.py [...]
    ncu --import F.ncu-rep --page source --print-source sass --csv > F_sass.csv
    python benchmarks/kernels/profiling/stall_report.py F_sass.csv [--top 12]
Prints the stall reasons' shares of all samples, the opcodes that collect them and the single hottest instructions
(with their listing index, to find them in the CSV). No GPU needed.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re


def load(path: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(path)))
    header = rows[1]
    return header, [r for r in rows[2:] if len(r) >= len(header)]


def report(path: str, top: int = 12) -> None:
    header, data = load(path)
    ix = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples_col = ix["Warp Stall Sampling (All Samples)"]
    by_reason: collections.Counter = collections.Counter()
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    executed: collections.Counter = collections.Counter()
    samples = 0
    for r in data:
        op = re.sub(r"^@!?U?P\w+\s+", "", r[1].strip()).split(" ")[0].split(".")[0]
        samples += int(r[samples_col] or 0)
        executed[op] += int(r[ix["Instructions Executed"]] or 0)
        for s in stalls:
            v = int(r[ix[s]] or 0)
            by_reason[s] += v
            by_op[op][s] += v
    samples = max(samples, 1)
    print(f"{path}: {samples} samples, {sum(executed.values())} warp instructions executed")
    for s, v in by_reason.most_common(top):
        print(f"  {s:26s} {100 * v / samples:5.1f} %")
    print("by opcode (share of samples; top reasons):")
    for op in sorted(by_op, key=lambda o: -sum(by_op[o].values()))[:top]:
        reasons = ", ".join(f"{k[6:]} {100 * v / samples:.1f}" for k, v in by_op[op].most_common(3))
        print(f"  {op:8s} {100 * sum(by_op[op].values()) / samples:5.1f} %  executed {executed[op]:>11d}  {reasons}")
    print("hottest instructions:")
    for i in sorted(range(len(data)), key=lambda i: -int(data[i][samples_col] or 0))[:top]:
        r = data[i]
        print(f"  [{i:5d}] {100 * int(r[samples_col] or 0) / samples:5.1f} %  {r[1].strip()[:80]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    for path in args.csv:
        report(path, args.top)
