"""Decode attention over KVarN tiles versus FlashAttention on a 16-bit KV cache, plus prefill quantize cost.

Run on a GPU:  python benchmarks/kernels/bench_decode.py --out DIR
Writes decode.json (every measurement, the setup and the command) and decode.png into DIR; they are kept as
benchmarks/kernels/results/decode/<gpu>/<date>_<commit>.{json,png}. Times are CUDA-graph replays (median of several), so
launch overhead is excluded for both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvarn_kernels.attention import decode_attention, paged_attention
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.state import PagedKV

H100_PEAK_BYTES_PER_S = 3.35e12


# Idle seconds before each timing of the comparison grids. A flash SDPA run at a large shape draws the H100's full
# 700 W and lowers its clocks; a decode timed right after it ran 12-16 % slower than on a rested GPU (batch 32 x 64K:
# 928 vs 800 us; 2 s later 799; results/variance_probe/h100/2026-11-24_4fcea14.log). Each side is timed rested.
COOLDOWN_S = 2.0


def graph_time_ms(fn, replays: int = 20, cooldown_s: float = 0.0) -> float:
    """Median milliseconds of one call, timed as CUDA-graph replays (after cooldown_s idle seconds)."""
    if cooldown_s:
        torch.cuda.synchronize()
        time.sleep(cooldown_s)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2]


def make_state(batch: int, ctx: int, hkv: int, fmt: KVarNFormat, dtype: torch.dtype, device: str = "cuda") -> PagedKV:
    """A KVarN state of `batch` sequences of `ctx` tokens with random (quantized) content."""
    g, d = fmt.group, fmt.head_dim
    n_tiles = max(ctx - g, 0) // g
    cache = fmt.allocate(max(batch * n_tiles, 1), hkv, device)
    if n_tiles:
        # Quantize real data into a few blocks (at most the cache's), then copy them around: content matters little
        # for speed. (Until 2026-11-24 (d266187) this wrote 8 blocks into caches of fewer, e.g. batch 1 x 1K's 7:
        # the eighth went
        # past the cache and, at head_dim 64, corrupted later launches.)
        k = min(8, cache.shape[0])
        src = torch.randn(k * g, hkv, d, device=device, dtype=dtype)
        starts = torch.arange(k, device=device, dtype=torch.int32) * g
        quantize_into_cache(src, src, starts, starts // g, cache, fmt)
        cache.copy_(cache[torch.arange(cache.shape[0], device=device) % k])
    perm = torch.randperm(max(batch * n_tiles, 1), device=device).to(torch.int32)
    block_table = perm[: batch * n_tiles].reshape(batch, n_tiles) if n_tiles else perm[:1].repeat(batch, 1)
    dense = torch.randn(2 * batch, hkv, g, d, device=device, dtype=dtype)
    return PagedKV(
        fmt=fmt, cache=cache, block_table=block_table.contiguous(),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        sink_k=dense, sink_v=dense, tail_k=dense, tail_v=dense,
        dense_table=torch.arange(2 * batch, dtype=torch.int32, device=device).reshape(batch, 2),
    )


def bench_decode(batches, contexts, hq, hkv, d, preset, dtype) -> list[dict]:
    rows = []
    fmt = KVarNFormat.from_preset(preset, d, dtype)
    for batch in batches:
        for ctx in contexts:
            row = {"batch": batch, "context": ctx}
            kv_bytes_16 = 2 * batch * ctx * hkv * d * 2
            if kv_bytes_16 > 40e9:
                continue
            q = torch.randn(batch, hq, 1, d, device="cuda", dtype=dtype)
            k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                row["sdpa_flash_ms"] = graph_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                                     cooldown_s=COOLDOWN_S)
            k = v = None  # free the 16-bit KV before building the packed one
            state = make_state(batch, ctx, hkv, fmt, dtype)
            qd = q[:, :, 0].contiguous()
            row["kvarn_ms"] = graph_time_ms(lambda: decode_attention(qd, state), cooldown_s=COOLDOWN_S)
            row["kvarn_bytes"] = batch * hkv * (fmt.record_bytes * (max(ctx - fmt.group, 0) // fmt.group)
                                                + 2 * 2 * d * min(ctx, 2 * fmt.group))
            row["sdpa_bytes"] = kv_bytes_16
            row["speedup_vs_sdpa_flash"] = row["sdpa_flash_ms"] / row["kvarn_ms"]
            row["kvarn_bandwidth_frac_of_peak"] = row["kvarn_bytes"] / (row["kvarn_ms"] * 1e-3) / H100_PEAK_BYTES_PER_S
            row["sdpa_bandwidth_frac_of_peak"] = kv_bytes_16 / (row["sdpa_flash_ms"] * 1e-3) / H100_PEAK_BYTES_PER_S
            state = None
            torch.cuda.empty_cache()
            rows.append(row)
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    return rows


def bench_prefill_quantize(contexts, hq, hkv, d, preset, dtype, batch: int = 1, warps=(None,)) -> list[dict]:
    """Cost of quantizing a prefill's KV (`batch` sequences) versus that prefill's causal attention (flash SDPA).

    warps: num_warps values to time the quantize kernel with (None: its own choice).
    """

    fmt = KVarNFormat.from_preset(preset, d, dtype)
    rows = []
    for ctx in contexts:
        q = torch.randn(batch, hq, ctx, d, device="cuda", dtype=dtype)
        k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=dtype)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            attn_ms = graph_time_ms(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True),
                                    cooldown_s=COOLDOWN_S)
        src = k.transpose(1, 2).reshape(batch * ctx, hkv, d).contiguous()  # [T, H, D], sequences back to back
        n = batch * ctx // fmt.group
        starts = torch.arange(n, device="cuda", dtype=torch.int32) * fmt.group
        cache = fmt.allocate(n, hkv, "cuda")
        for w in warps:
            overrides = {"num_warps": w} if w is not None else None
            quant_ms = graph_time_ms(lambda o=overrides: quantize_into_cache(src, src, starts, starts // fmt.group,
                                                                             cache, fmt, launch_overrides=o),
                                     cooldown_s=COOLDOWN_S)
            rows.append({"batch": batch, "context": ctx, "num_warps": w or "default", "attention_ms": attn_ms,
                         "quantize_ms": quant_ms, "ratio": quant_ms / attn_ms,
                         "us_per_program": quant_ms * 1e3 / (2 * n * hkv) * torch.cuda.get_device_properties(
                             0).multi_processor_count})
            tqdm.write(json.dumps(rows[-1]))
    return rows


def bench_chunk(hq, hkv, d, preset, dtype) -> list[dict]:
    """Chunk attention (prefill continuation / verify) over a quantized history versus flash SDPA on 16-bit."""
    from kvarn_kernels import attention

    fmt = KVarNFormat.from_preset(preset, d, dtype)
    rows = []
    for hist, chunk in [(16384, 4), (16384, 16), (16384, 32), (16384, 64), (16384, 128), (16384, 512),
                        (16384, 2048), (65536, 8), (65536, 512)]:
        state = make_state(1, hist, hkv, fmt, dtype)
        q = torch.randn(chunk, hq, d, device="cuda", dtype=dtype)
        kn = torch.randn(chunk, hkv, d, device="cuda", dtype=dtype)
        cu_q = torch.tensor([0, chunk], device="cuda", dtype=torch.int32)
        # Both routes at every size: the packed-tile kernel, and history dequantized once + varlen flash; "kvarn"
        # is the one paged_attention picks.
        default = "dense" if attention._dense_chunk(q, state, chunk, kn, None, attention.TUNING) else "packed"
        route = {}
        for name, dense in (("packed", False), ("dense", True)):
            tuning = dataclasses.replace(attention.TUNING, dense_chunks=dense, dense_chunk_min_queries=1)
            try:
                route[name] = graph_time_ms(lambda t=tuning: paged_attention(q, state, cu_q, chunk, kn, kn, cu_q,
                                                                             tuning=t), cooldown_s=COOLDOWN_S)
            except Exception as e:  # noqa: BLE001 - e.g. no varlen flash attention in this torch
                route[name] = float("nan")
                tqdm.write(f"{name} route failed: {type(e).__name__}: {e}")
        # Flash SDPA's is_causal is top-left aligned: pad the queries to the full length and keep the last
        # `chunk` rows' cost out by timing a chunk-sized query block against the full keys (bottom-right
        # causality differs only on the chunk's own tokens, a negligible share of the work).
        qs = q.transpose(0, 1)[None]
        ks = torch.randn(1, hkv, hist + chunk, d, device="cuda", dtype=dtype)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            sdpa_ms = graph_time_ms(lambda: F.scaled_dot_product_attention(qs, ks, ks, enable_gqa=True),
                                    cooldown_s=COOLDOWN_S)
        kvarn_ms = route[default]
        rows.append({"history": hist, "chunk": chunk, "kvarn_ms": kvarn_ms, "sdpa_ms": sdpa_ms,
                     "speedup": sdpa_ms / kvarn_ms, "packed_ms": route["packed"], "dense_ms": route["dense"],
                     "default_route": default})
        tqdm.write(json.dumps(rows[-1]))
    return rows


def tune(hq, hkv, d, preset, dtype) -> list[dict]:
    """Sweep the attention kernel's launch options on a few decode shapes."""
    from kvarn_kernels import attention

    fmt = KVarNFormat.from_preset(preset, d, dtype)
    rows = []
    for batch, ctx in [(1, 2048), (1, 16384), (8, 16384), (64, 16384)]:
        state = make_state(batch, ctx, hkv, fmt, dtype)
        q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
        for opts in ({"num_warps": 4, "num_stages": 1}, {"num_warps": 4, "num_stages": 2},
                     {"num_warps": 4, "num_stages": 3}, {"num_warps": 8, "num_stages": 1},
                     {"num_warps": 8, "num_stages": 2}, {"num_warps": 4, "num_stages": 2, "maxnreg": 128},
                     {"num_warps": 4, "num_stages": 1, "maxnreg": 168}):
            tuning = dataclasses.replace(attention.TUNING, launch_options=opts)
            ms = graph_time_ms(lambda t=tuning: decode_attention(q, state, tuning=t))
            rows.append({"batch": batch, "context": ctx, **opts, "ms": ms})
            tqdm.write(json.dumps(rows[-1]))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        ctx = [r["context"] for r in sel]
        axes[0].plot(ctx, [r["speedup_vs_sdpa_flash"] for r in sel], marker="o", label=f"batch {batch}")
        axes[1].plot(ctx, [100 * r["kvarn_bandwidth_frac_of_peak"] for r in sel], marker="o", label=f"batch {batch}")
    axes[0].axhline(1.0, color="gray", ls="--")
    axes[0].set(xscale="log", xlabel="context (tokens)", ylabel="speedup vs flash SDPA (16-bit KV)",
                title="KVarN k4v2 decode attention")
    axes[1].set(xscale="log", xlabel="context (tokens)", ylabel="% of H100 peak bandwidth (3.35 TB/s)",
                title="KVarN bytes moved / time")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/kernels/results")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="1024,2048,4096,16384,65536,131072")
    ap.add_argument("--preset", default="kvarn_k4v2_g128")
    ap.add_argument("--head-dim", type=int, default=128, help="head_dim (default 128; 96: Phi-3-mini's)")
    ap.add_argument("--tune", action="store_true", help="only sweep launch options")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only time the prefill quantize kernel (writes prefill_quantize.json)")
    ap.add_argument("--prefill-batches", default="1", help="batches for the prefill quantize timing")
    ap.add_argument("--chunk-only", action="store_true",
                    help="only time chunk attention, both routes (writes chunk.json)")
    ap.add_argument("--quantize-warps", default="",
                    help="comma-separated num_warps to sweep for the quantize kernel (default: its own choice)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype, hq, hkv, d = torch.bfloat16, 32, 8, args.head_dim
    setup = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(),
        "preset": args.preset, "dtype": str(dtype), "q_heads": hq, "kv_heads": hkv, "head_dim": d,
        "timing": f"median of 5 x 20 CUDA-graph replays, each side after {COOLDOWN_S} s idle",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/kernels/bench_decode.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k not in ("tune", "out", "prefill_only", "chunk_only")),
    }
    if args.chunk_only:
        (out / "chunk.json").write_text(json.dumps({"setup": setup, "chunk": bench_chunk(hq, hkv, d, args.preset,
                                                                                         dtype)}, indent=1))
        return
    if args.tune:
        (out / "tune.json").write_text(json.dumps({"setup": setup, "tune": tune(hq, hkv, d, args.preset, dtype)}))
        return
    warps = [int(x) for x in args.quantize_warps.split(",") if x] or [None]
    prefill = []
    for b in (int(x) for x in args.prefill_batches.split(",")):
        prefill += bench_prefill_quantize([4096, 16384, 32768], hq, hkv, d, args.preset, dtype, b, warps)
    if args.prefill_only:
        (out / "prefill_quantize.json").write_text(json.dumps({"setup": setup, "prefill_quantize": prefill},
                                                              indent=1))
        return
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    decode = bench_decode(batches, contexts, hq, hkv, d, args.preset, dtype)
    chunk = bench_chunk(hq, hkv, d, args.preset, dtype)
    (out / "decode.json").write_text(json.dumps({"setup": setup, "decode": decode, "prefill_quantize": prefill,
                                                 "chunk": chunk}, indent=1))
    plot(decode, out / "decode.png")


if __name__ == "__main__":
    main()
