"""Ahead-of-time compiles of the Triton kernels for an H100 (sm_90) on any machine, GPU or not.

Triton's bundled ptxas compiles without a GPU, which catches what the interpreter cannot see (compile errors, shared
memory over an H100's 227 KB, register spills). The sm_90 compile test and the register/SASS tools in
`benchmarks/kernels/compile_stats*.py` all compile through these functions, with the launch options the real launches
use, so what they check is what runs. Not for use under TRITON_INTERPRET=1 (jitted functions cannot be compiled
there).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvarn_kernels import attention, quantize
from kvarn_kernels.format import DEFAULT_PRESET, KVarNFormat, word_dtype

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # per block, opt-in maximum
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int16: "i16",
                torch.uint8: "u8"}
DOTS = {"float32": tl.float32, "float16": tl.float16, "bfloat16": tl.bfloat16}


def _compile(fn: Any, constexprs: dict, ptr_types: dict, aligned: set[str], options: dict) -> Any:
    """Compile `fn` for sm_90. Pointers and the `aligned` integer arguments are declared multiples of 16, as the
    runtime specializes them for the real launches (record strides and base pointers are)."""
    sig = {name: "constexpr" if name in constexprs else ptr_types.get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in aligned}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=H100, options=options)


def attention_kernel(dot: str = "bfloat16", head_dim: int = 128, n_rep: int = 4, chunk_rows: int = 0,
                     preset: str = DEFAULT_PRESET, num_splits: int = 1, options: dict | None = None,
                     tile_groups: int | None = None) -> Any:
    """The paged attention kernel as `paged_attention` launches it for a model whose tensor-core operands are `dot`
    ("bfloat16", "float16", "float32") over `preset` records (its bit widths and group): decode (chunk_rows=0, 16
    rows) or a chunk program of `chunk_rows` (query, head) rows. num_splits=1 compiles the epilogue that stores the
    output, more the split-partial one. `options` replaces the launch options (`attention.launch_options`).
    tile_groups: decode's row groups (None: what a long context gets, `attention.tile_groups`)."""
    dt = DOTS[dot]
    fmt = KVarNFormat.from_preset(preset, head_dim, getattr(torch, dot))
    magic, offset = attention.code_conversion(dt, head_dim)
    rows = chunk_rows or max(16, triton.next_power_of_2(n_rep))
    block_m = max(1, chunk_rows // n_rep) if chunk_rows else 1
    if tile_groups is None:
        tile_groups = attention.tile_groups(rows, n_rep, block_m, 1 << 20,
                                            torch.float32 if dot == "float32" else torch.bfloat16)
    constexprs = {
        "N_REP": n_rep, "G": fmt.group, "D": head_dim, "KBITS": fmt.k_bits, "VBITS": fmt.v_bits,
        "BLOCK_M": block_m, "ROWS": rows, "HAS_NEW": bool(chunk_rows),
        "NUM_SPLITS": num_splits, "DOT": dt, "PRECISION": "ieee" if dt == tl.float32 else "tf32",
        "DENSE_BLOCK": attention.TUNING.dense_block, "MAGIC": magic, "OFFSET": offset, "UNROTATE_F32": dt == tl.float32,
        "TG": tile_groups, "DU": attention.dense_units(bool(chunk_rows)),
        "PDL": num_splits > 1 and attention.TUNING.pdl,  # as an H100 launch has it
        "ROT_PARTS": attention.merge_unrotates(num_splits, tile_groups, head_dim, block_m, bool(chunk_rows)),
    }
    act = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dot]
    scales = "*" + TRITON_TYPES[fmt.scale_dtype]  # bfloat16 scales for bfloat16 and float32 models
    ptrs = {name: act for name in ("q", "hadamard_ptr", "k_new", "v_new", "sink_k", "sink_v", "tail_k", "tail_v",
                                   "out")}
    ptrs.update({name: "*i32" for name in ("cu_q", "cu_k", "seq_lens", "block_table", "dense_table")})
    ptrs.update({name: "*fp32" for name in ("part", "part_lse")})
    ptrs.update({"k_words": "*" + TRITON_TYPES[word_dtype(fmt.k_bits)],
                 "v_words": "*" + TRITON_TYPES[word_dtype(fmt.v_bits)], "scales": scales, "sm_scale": "fp32"})
    aligned = {"kw_sb", "kw_sh", "vw_sb", "vw_sh", "scales_sb", "scales_sh", "stride_db", "stride_dh", "stride_qt",
               "stride_qh", "stride_nt", "stride_nh", "stride_ps", "stride_pt", "stride_ph"}
    opts = dict(options if options is not None else attention.launch_options(
        rows, head_dim, dt, tile_groups, n_rep, num_splits, decode=not chunk_rows))
    return _compile(attention._paged_attention_kernel, constexprs, ptrs, aligned, opts)


def merge_kernel(head_dim: int, splits: int = 64, out_dtype: str = "bf16", unrotate: bool = False) -> Any:
    """The split merge as `paged_attention` launches it for `splits` partials (64: the most it picks); unrotate: the
    build that un-rotates outputs left rotated (`attention.merge_unrotates`)."""
    pdl = attention.TUNING.pdl
    constexprs = dict(attention.merge_meta(splits, head_dim, unrotate), PDL=pdl)
    options = {"num_warps": constexprs.pop("num_warps"), "launch_pdl": pdl}
    ptrs = {"part": "*fp32", "part_lse": "*fp32", "out": "*" + out_dtype}
    return _compile(attention._merge_splits_kernel, constexprs, ptrs, set(), options)


def quantize_kernel(dtype: torch.dtype, head_dim: int = 128, preset: str = DEFAULT_PRESET,
                    num_warps: int | None = None, maxnreg: int = 0, weights: bool = False) -> tuple[Any, dict]:
    """The quantize kernel as `quantize_into_cache` launches it for a `dtype` model and `preset` records, with
    K-frame channel weights or without; (kernel, launch options)."""
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    options = quantize.launch_options(fmt, dtype)
    constexprs = dict(options.pop("constexprs"), HAS_WEIGHTS=weights)
    options.pop("interpreted", None)
    if num_warps:
        options["num_warps"] = num_warps
    if maxnreg:
        options["maxnreg"] = maxnreg
    ptrs = {
        "k_src": "*" + TRITON_TYPES[dtype], "v_src": "*" + TRITON_TYPES[dtype],
        "signs": "*" + TRITON_TYPES[fmt.scale_dtype], "tile_starts": "*i32",
        "block_ids": "*i32", "k_words": "*" + TRITON_TYPES[word_dtype(fmt.k_bits)],
        "v_words": "*" + TRITON_TYPES[word_dtype(fmt.v_bits)], "scales": "*" + TRITON_TYPES[fmt.scale_dtype],
        "k_weights": "*fp32" if weights else "*" + TRITON_TYPES[fmt.scale_dtype],
    }
    fn = quantize._quantize_tiles_kernel
    aligned = {name for name in fn.arg_names
               if name.endswith("_stride_b") or name.endswith("_stride_h") or name in ("stride_t", "stride_h")}
    return _compile(fn, constexprs, ptrs, aligned, options), options


def dense_history_kernel(dtype: torch.dtype, head_dim: int = 128, preset: str = DEFAULT_PRESET) -> Any:
    """The dense-history kernel (large-chunk route) as `dense_history.dense_history` launches it for a `dtype`
    model and `preset` records, with new tokens."""
    from kvarn_kernels import dense_history

    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    act = "*" + TRITON_TYPES[dtype]
    ptrs = {name: act for name in ("k_out", "v_out", "sink_k", "sink_v", "tail_k", "tail_v", "k_new", "v_new")}
    ptrs.update({name: "*i32" for name in ("cu_out", "seq_lens", "block_table", "dense_table", "cu_k")})
    ptrs.update({"k_words": "*" + TRITON_TYPES[word_dtype(fmt.k_bits)],
                 "v_words": "*" + TRITON_TYPES[word_dtype(fmt.v_bits)], "scales": "*" + TRITON_TYPES[fmt.scale_dtype],
                 "hadamard_ptr": "*bf16"})
    constexprs = {"G": fmt.group, "D": head_dim, "KBITS": fmt.k_bits, "VBITS": fmt.v_bits, "HAS_NEW": True,
                  "UNROTATE_F32": dtype == torch.float32}
    fn = dense_history._dense_history_kernel
    aligned = {name for name in fn.arg_names if name.startswith("stride_") or name[-3:] in ("_sb", "_sh")}
    return _compile(fn, constexprs, ptrs, aligned, {"num_warps": dense_history.NUM_WARPS})


def cuobjdump(kernel: Any, *flags: str) -> str:
    """cuobjdump's output for a compiled kernel's cubin (e.g. "--dump-resource-usage" or "-sass"), through
    Triton's bundled binary."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([tool, *flags, path], capture_output=True, text=True, check=True).stdout


def resources(kernel: Any) -> dict[str, int]:
    """ptxas's per-thread resources of a compiled kernel from cuobjdump (without a GPU the kernel object has no
    n_regs): {"REG": registers, "STACK": bytes, "LOCAL": bytes (spills), ...}."""
    usage = cuobjdump(kernel, "--dump-resource-usage")
    line = [ln for ln in usage.splitlines() if "REG:" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def sass_loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of every backward branch's body in a `cuobjdump -sass` listing, in listing order:
    a loop's length per iteration is a proxy of its cost that needs no GPU."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            body = ins[index[int(target.group(1), 16)]:i + 1]
            loops.append((len(body), collections.Counter(
                t.split()[1 if t.startswith("@") else 0].split(".")[0] for _, t in body)))
    return loops
