"""Compile the attention kernel for sm_90 without a GPU and print registers, spills and shared memory.

    python -m benchmarks.kernels.compile_stats [--dot bfloat16] [--head-dim 128] [--n-rep 4] [--chunk-rows 64]
        [--splits 1] [--tile-groups N] [--num-warps N] [--maxnreg N] [--preset kvarn_k4v2_g128] [--loop-sass]
Uses Triton's bundled ptxas/cuobjdump (`benchmarks.kernels.aot`): a fast loop for register-pressure work on a CPU-only
machine. Launch options default to the ones the real launch uses (`attention.launch_options`).
"""

import argparse
import collections

import torch

from benchmarks.kernels import aot
from kvarn_kernels import DEFAULT_PRESET, PRESETS, attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dot", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the model's tensor-core operand dtype")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--n-rep", type=int, default=4)
    ap.add_argument("--num-warps", type=int, default=0, help="override the launch's num_warps")
    ap.add_argument("--num-stages", type=int, default=0, help="override the launch's num_stages")
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="bit widths and group")
    ap.add_argument("--maxnreg", type=int, default=0, help="override the launch's register cap (-1: none)")
    ap.add_argument("--tile-groups", type=int, default=0,
                    help="decode's row groups (tiles attended at once; 0: what a long context gets)")
    ap.add_argument("--splits", type=int, default=1,
                    help="1 compiles the epilogue that stores the output; more, the split-partial epilogue")
    ap.add_argument("--chunk-rows", type=int, default=0,
                    help="compile the chunk variant (new 16-bit tokens) with this many (query, head) rows")
    ap.add_argument("--loop-sass", action="store_true",
                    help="also print the SASS instruction count and opcode mix of the longest loop (the tile loop)")
    args = ap.parse_args()
    rows = args.chunk_rows or 16
    block_m = max(1, args.chunk_rows // args.n_rep) if args.chunk_rows else 1
    groups = args.tile_groups or attention.tile_groups(  # as aot.attention_kernel picks them for a long context
        rows, args.n_rep, block_m, 1 << 20, torch.float32 if args.dot == "float32" else torch.bfloat16)
    options = dict(attention.launch_options(rows, args.head_dim, aot.DOTS[args.dot], groups, args.n_rep, args.splits,
                                           decode=not args.chunk_rows))
    if args.num_warps:
        options["num_warps"] = args.num_warps
    if args.num_stages:
        options["num_stages"] = args.num_stages
    if args.maxnreg > 0:
        options["maxnreg"] = args.maxnreg
    elif args.maxnreg < 0:
        options.pop("maxnreg", None)
    kernel = aot.attention_kernel(args.dot, args.head_dim, args.n_rep, args.chunk_rows, args.preset, args.splits,
                                  options, args.tile_groups or None)
    print(options)
    print(aot.cuobjdump(kernel, "--dump-resource-usage").strip().splitlines()[-1].strip())
    print("shared bytes:", kernel.metadata.shared)
    if args.loop_sass:
        count, mix = longest_loop(aot.cuobjdump(kernel, "-sass"))
        print(f"longest loop: {count} SASS instructions per warp per iteration;",
              ", ".join(f"{op} {n}" for op, n in mix))


def longest_loop(sass: str) -> tuple[int, list[tuple[str, int]]]:
    """(instructions, opcode mix) of the longest loop body (the tile loop): the attention kernel is issue-bound, so
    its length is a proxy of its speed that needs no GPU."""
    count, ops = max(aot.sass_loops(sass), key=lambda loop: loop[0], default=(0, collections.Counter()))
    return count, ops.most_common(12)


if __name__ == "__main__":
    main()
