"""Compile the attention kernel for sm_90 without a GPU and print registers, spills and shared memory.

    python benchmarks/kernels/compile_stats.py [--head-dim 128] [--n-rep 4] [--num-warps 4] [--loop-sass]
Uses Triton's bundled ptxas/cuobjdump: a fast loop for register-pressure work on a CPU-only machine.
"""

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvarn_kernels.attention import _paged_attention_kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--n-rep", type=int, default=4)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--kbits", type=int, default=4)
    ap.add_argument("--vbits", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--chunk-rows", type=int, default=0,
                    help="compile the chunk variant (new 16-bit tokens) with this many (query, head) rows")
    ap.add_argument("--loop-sass", action="store_true",
                    help="also print the SASS instruction count and opcode mix of the longest loop (the tile loop)")
    args = ap.parse_args()
    fn = _paged_attention_kernel
    sig = {}
    constexprs = {
        "N_REP": args.n_rep, "G": 128, "D": args.head_dim, "KBITS": args.kbits, "VBITS": args.vbits,
        "BLOCK_M": max(1, args.chunk_rows // args.n_rep) if args.chunk_rows else 1,
        "ROWS": args.chunk_rows or max(16, triton.next_power_of_2(args.n_rep)), "HAS_NEW": bool(args.chunk_rows),
        "NUM_SPLITS": 1,
        "DOT": tl.bfloat16, "PRECISION": "tf32", "DENSE_BLOCK": 32, "MAGIC": 0x4300, "OFFSET": 128.0,
        "UNROTATE_F32": False,
    }
    ptr_types = {
        "q": "*bf16", "hadamard_ptr": "*bf16", "k_new": "*bf16", "v_new": "*bf16", "cu_q": "*i32", "cu_k": "*i32",
        "seq_lens": "*i32", "block_table": "*i32", "dense_table": "*i32",
        "k_words": "*i16" if args.kbits == 4 else "*u8", "v_words": "*i16" if args.vbits == 4 else "*u8",
        "scales": "*bf16", "sink_k": "*bf16", "sink_v": "*bf16", "tail_k": "*bf16", "tail_v": "*bf16",
        "part": "*fp32", "part_m": "*fp32", "part_l": "*fp32", "out": "*bf16", "sm_scale": "fp32",
    }
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = ptr_types.get(name, "i32")
    # Mimic the runtime's specialization: pointers and the record strides are multiples of 16.
    aligned = {"kw_sb", "kw_sh", "vw_sb", "vw_sh", "scales_sb", "scales_sh", "stride_db", "stride_dh", "stride_qt",
               "stride_qh", "stride_nt", "stride_nh", "stride_ps", "stride_pt", "stride_ph"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in aligned}
    src = ASTSource(fn, sig, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": args.num_warps, "num_stages": args.num_stages,
                                     **({"maxnreg": args.maxnreg} if args.maxnreg else {})})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = ""
        if args.loop_sass:
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    print(out.strip().splitlines()[-1].strip())
    print("shared bytes:", kernel.metadata.shared)
    if args.loop_sass:
        count, mix = longest_loop(sass)
        print(f"longest loop: {count} SASS instructions per warp per iteration;",
              ", ".join(f"{op} {n}" for op, n in mix))


def longest_loop(sass: str) -> tuple[int, list[tuple[str, int]]]:
    """(instructions, opcode mix) of the longest backward branch's body in a cuobjdump -sass listing. The attention
    kernel is issue-bound, so the tile loop's length is a proxy of its speed that needs no GPU."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    best = (0, 0)
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            start = index[int(target.group(1), 16)]
            best = max(best, (i - start + 1, start), key=lambda b: b[0])
    body = ins[best[1]:best[1] + best[0]]
    ops = collections.Counter(t.split()[1 if t.startswith("@") else 0].split(".")[0] for _, t in body)
    return best[0], ops.most_common(12)


if __name__ == "__main__":
    main()
