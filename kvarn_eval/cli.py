"""The `kvarn` command: format info, a self-check of the kernel core, the real-model demo, quality reports."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kvarn_kernels import DEFAULT_PRESET, PRESETS, KVarNFormat


def _dtype(name: str) -> torch.dtype:
    allowed = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in allowed:
        raise argparse.ArgumentTypeError(f"dtype {name!r} is not supported: use one of {', '.join(allowed)}")
    return allowed[name]


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
    return 0


def selfcheck(preset: str, device: str, head_dim: int = 128, tokens: int = 1024, seed: int = 0) -> dict:
    """Quantize synthetic K/V with outlier channels through the paged kernels; measure the damage."""
    from kvarn_kernels import ops, reference
    from kvarn_kernels.reference import synthetic_kv
    from kvarn_kernels.state import build_paged_kv

    from .baselines import kivi_tiles

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
    k_kivi, v_kivi = kivi_tiles(k_t, v_t, fmt.k_bits, fmt.v_bits)

    q = torch.randn(1, 32, head_dim, device=device, generator=None).to(dtype) * 2
    out = ops.paged_attention(q, state, torch.tensor([0, 1], dtype=torch.int32, device=device), 1)
    exact = _attention(q, k, v)
    kivi_k = torch.cat([k[:g].float(), k_kivi.transpose(1, 2).reshape(-1, 8, head_dim), k[g * (1 + n):].float()])
    kivi_v = torch.cat([v[:g].float(), v_kivi.transpose(1, 2).reshape(-1, 8, head_dim), v[g * (1 + n):].float()])
    kivi_out = _attention(q, kivi_k, kivi_v)
    elapsed = time.perf_counter() - start

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    return {
        "preset": preset, "device": device, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
        "bytes_per_token_per_head": fmt.bytes_per_token_per_head, "compression_vs_16bit": fmt.compression_vs_16bit,
        "kvarn": {"k_rel_err": rel(k_hat, k_t), "v_rel_err": rel(v_hat, v_t), "attn_rel_err": rel(out, exact)},
        "kivi": {"k_rel_err": rel(k_kivi, k_t), "v_rel_err": rel(v_kivi, v_t), "attn_rel_err": rel(kivi_out, exact)},
        "seconds": elapsed,
    }


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain attention of one query [1, Hq, D] over k, v [L, H, D] (float32)."""
    rep = q.shape[1] // k.shape[1]
    kk = k.float().transpose(0, 1).repeat_interleave(rep, 0)
    vv = v.float().transpose(0, 1).repeat_interleave(rep, 0)
    p = torch.softmax(q.float()[0][:, None] @ kk.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ vv).transpose(0, 1)


def cmd_selfcheck(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = selfcheck(args.preset, device, args.head_dim)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"KVarN self-check: {r['preset']} on {r['device']} ({r['dtype']}), {r['tokens']} synthetic tokens, "
          f"8 KV heads, head_dim {args.head_dim}")
    print(f"  storage: {r['bytes_per_token_per_head']:.1f} B/token/head, "
          f"{r['compression_vs_16bit']:.2f}x smaller than 16-bit")
    print(f"  {'relative error':<22}{'KVarN':>10}{'KIVI-style RTN':>16}")
    for key, label in (("k_rel_err", "keys"), ("v_rel_err", "values"), ("attn_rel_err", "attention output")):
        print(f"  {label:<22}{r['kvarn'][key]:>10.4f}{r['kivi'][key]:>16.4f}")
    print(f"  took {r['seconds']:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    demo_main(args.rest)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from .quality import main as quality_main

    quality_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvarn", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="byte layout, bits per element and compression of a preset")
    info.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS))
    info.add_argument("--head-dim", type=int, default=128)
    info.add_argument("--dtype", type=_dtype, default=torch.float16, help="activation dtype (sets the scale dtype)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)
    check = sub.add_parser("selfcheck", help="quantize synthetic K/V and report errors against KIVI-style RTN")
    check.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS))
    check.add_argument("--head-dim", type=int, default=128, choices=[64, 128, 256])
    check.add_argument("--device", choices=["cpu", "cuda"])
    check.add_argument("--json", action="store_true")
    check.set_defaults(fn=cmd_selfcheck)
    for name, fn, text in (("demo", cmd_demo, "real-model demo: SmolLM2 with KVarNCache vs the 16-bit cache"),
                           ("quality", cmd_quality, "KVarN vs KIVI-style RTN on synthetic and real K/V")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(fn=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    # demo/quality own their options: everything after the subcommand goes to them untouched.
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in ("demo", "quality"):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"kvarn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
