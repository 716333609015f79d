"""Compile the quantize kernel for sm_90 without a GPU and print registers, spills, shared memory and SASS mix.

    python benchmarks/kernels/compile_stats_quantize.py [--dtype bf16] [--head-dim 128] [--group 128]
        [--kbits 4] [--vbits 2] [--num-warps N] [--all]
Uses Triton's bundled ptxas/cuobjdump: a fast loop for register-pressure work on a CPU-only machine.
Launch options default to the ones `quantize_into_cache` uses (`quantize.launch_options`). --all runs a
fixed set of configurations and prints one line each.
"""

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvarn_kernels import quantize
from kvarn_kernels.format import KVarNFormat, word_dtype

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int16: "i16",
                torch.uint8: "u8"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# SASS opcode families worth watching (prefix match on the opcode before its first dot).
FAMILIES = ["FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "HMMA", "HGMMA", "LDL", "STL", "LDS", "STS", "BAR", "SHFL",
            "LDG", "STG", "F2F", "I2F", "F2I"]


def compile_quantize(dtype: torch.dtype, head_dim: int, group: int, kbits: int, vbits: int,
                     num_warps: int | None = None, maxnreg: int = 0):
    fmt = KVarNFormat(f"k{kbits}v{vbits}", kbits, vbits, group, head_dim,
                      torch.float16 if dtype == torch.float16 else torch.bfloat16)
    fn = quantize._quantize_tiles_kernel
    options = quantize.launch_options(fmt, dtype)
    constexprs = dict(options.pop("constexprs"))
    options.pop("interpreted", None)
    if num_warps:
        options["num_warps"] = num_warps
    if maxnreg:
        options["maxnreg"] = maxnreg
    ptr_types = {
        "k_src": "*" + TRITON_TYPES[dtype], "v_src": "*" + TRITON_TYPES[dtype],
        "signs": "*fp16" if dtype == torch.float16 else "*bf16", "tile_starts": "*i32",
        "block_ids": "*i32", "k_words": "*" + TRITON_TYPES[word_dtype(kbits)],
        "v_words": "*" + TRITON_TYPES[word_dtype(vbits)], "scales": "*" + TRITON_TYPES[fmt.scale_dtype],
    }
    sig = {name: "constexpr" if name in constexprs else ptr_types.get(name, "i32") for name in fn.arg_names}
    # Mimic the runtime's specialization: pointers and the record/token strides are multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name.endswith("_stride_b") or name.endswith("_stride_h")
             or name in ("stride_t", "stride_h")}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), options


def stats(kernel) -> dict:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", path], capture_output=True,
                              text=True).stdout
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


def report(dtype_name, head_dim, group, kbits, vbits, num_warps=None, maxnreg=0) -> None:
    kernel, options = compile_quantize(DTYPES[dtype_name], head_dim, group, kbits, vbits, num_warps, maxnreg)
    s = stats(kernel)
    mix = " ".join(f"{k}={v}" for k, v in s["mix"].items() if v)
    print(f"{dtype_name} D={head_dim} G={group} k{kbits}v{vbits} warps={options['num_warps']}: regs={s['regs']} "
          f"stack={s['stack']}B shared={s['shared']}B sass={s['sass_total']} | {mix}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--kbits", type=int, default=4)
    ap.add_argument("--vbits", type=int, default=2)
    ap.add_argument("--num-warps", type=int, default=0, help="override the launch's num_warps")
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="a fixed sweep of dtypes, head dims and bit widths")
    args = ap.parse_args()
    if args.all:
        for dtype_name, d, g, kb, vb in [
            ("bf16", 128, 128, 4, 2), ("fp16", 128, 128, 4, 2), ("bf16", 128, 128, 4, 4), ("bf16", 64, 128, 4, 2),
            ("bf16", 256, 128, 4, 2), ("bf16", 128, 64, 4, 2), ("fp32", 128, 128, 4, 2),
        ]:
            report(dtype_name, d, g, kb, vb, args.num_warps or None, args.maxnreg)
        return
    report(args.dtype, args.head_dim, args.group, args.kbits, args.vbits, args.num_warps or None, args.maxnreg)


if __name__ == "__main__":
    main()
