"""Compile the quantize kernel for sm_90 without a GPU and print registers, spills, shared memory and SASS mix.

    python -m benchmarks.kernels.compile_stats_quantize [--dtype bf16] [--head-dim 128] [--preset kvarn_k4v2_g128]
        [--num-warps N] [--all]
Uses Triton's bundled ptxas/cuobjdump (`benchmarks.kernels.aot`): a fast loop for register-pressure work on a CPU-only
machine.
Launch options default to the ones `quantize_into_cache` uses (`quantize.launch_options`). --all runs a
fixed set of configurations and prints one line each.
"""

import argparse
import collections
import re

import torch

from benchmarks.kernels import aot
from kvarn_kernels import DEFAULT_PRESET, PRESETS, KVarNFormat

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# SASS opcode families worth watching (prefix match on the opcode before its first dot).
FAMILIES = ["FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "HMMA", "HGMMA", "LDL", "STL", "LDS", "STS", "BAR", "SHFL",
            "LDG", "STG", "F2F", "I2F", "F2I"]


def stats(kernel) -> dict:
    res = aot.cuobjdump(kernel, "--dump-resource-usage")
    sass = aot.cuobjdump(kernel, "-sass")
    out = {"resource": res.strip().splitlines()[-1].strip(), "shared": kernel.metadata.shared}
    m = re.search(r"REG:(\d+)", res)
    out["regs"] = int(m.group(1)) if m else -1
    m = re.search(r"STACK:(\d+)", res)  # spilled registers live on the stack (LOCAL stays 0)
    out["stack"] = int(m.group(1)) if m else -1
    ptx = kernel.asm["ptx"]
    counts = collections.Counter()
    total = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not m:
            continue
        total += 1
        counts[m.group(1)] += 1
    out["sass_total"] = total
    out["mix"] = {f: sum(c for op, c in counts.items() if op == f) for f in FAMILIES}
    out["ptx_lines"] = ptx.count("\n")
    return out


def report(dtype_name, head_dim, preset, num_warps=None, maxnreg=0) -> None:
    kernel, options = aot.quantize_kernel(DTYPES[dtype_name], head_dim, preset, num_warps, maxnreg)
    s = stats(kernel)
    mix = " ".join(f"{k}={v}" for k, v in s["mix"].items() if v)
    fmt = KVarNFormat.from_preset(preset, head_dim)
    print(f"{dtype_name} D={head_dim} G={fmt.group} k{fmt.k_bits}v{fmt.v_bits} warps={options['num_warps']}: "
          f"regs={s['regs']} "
          f"stack={s['stack']}B shared={s['shared']}B sass={s['sass_total']} | {mix}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="bit widths and group")
    ap.add_argument("--num-warps", type=int, default=0, help="override the launch's num_warps")
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="a fixed sweep of dtypes, head dims and bit widths")
    args = ap.parse_args()
    if args.all:
        for dtype_name, d, preset in [
            ("bf16", 128, "kvarn_k4v2_g128"), ("fp16", 128, "kvarn_k4v2_g128"), ("bf16", 128, "kvarn_k4v4_g128"),
            ("bf16", 64, "kvarn_k4v2_g128"), ("bf16", 256, "kvarn_k4v2_g128"), ("bf16", 128, "kvarn_k4v2_g64"),
            ("fp32", 128, "kvarn_k4v2_g128"),
        ]:
            report(dtype_name, d, preset, args.num_warps or None, args.maxnreg)
        return
    report(args.dtype, args.head_dim, args.preset, args.num_warps or None, args.maxnreg)


if __name__ == "__main__":
    main()
