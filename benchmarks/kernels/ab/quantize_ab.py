"""A/B of the prefill quantize kernel between code versions, on a GPU: times and the cache bytes each writes.

    PYTHONPATH=abtest/v0:. python benchmarks/kernels/ab/quantize_ab.py v0 --save /tmp/qab
    PYTHONPATH=abtest/v1:. python benchmarks/kernels/ab/quantize_ab.py v1 --save /tmp/qab
    python benchmarks/kernels/ab/quantize_ab.py --compare /tmp/qab v0 v1

(abtest/vX holds a copy of one version's kvarn_kernels package.) One JSON line per shape: milliseconds per
`quantize_into_cache` call (CUDA-graph median, as `bench_decode.py --prefill-only`). The caches of each shape go to
--save; --compare counts the bytes two versions' caches differ in. Inputs are seeded normal K/V, half of the shapes
with outlier channels (x50 on every 16th channel) so that the K-frame choice and the guard see both cases.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# (preset, head_dim, dtype, tokens, outliers)
SHAPES = [
    ("kvarn_k4v2_g128", 128, torch.bfloat16, 4096, False),
    ("kvarn_k4v2_g128", 128, torch.bfloat16, 16384, False),
    ("kvarn_k4v2_g128", 128, torch.bfloat16, 32768, False),
    ("kvarn_k4v2_g128", 128, torch.bfloat16, 16384, True),
    ("kvarn_k4v2_g128", 128, torch.float16, 16384, True),
    ("kvarn_k4v4_g128", 128, torch.bfloat16, 16384, True),
    ("kvarn_k2v2_g128", 128, torch.bfloat16, 16384, True),
    ("kvarn_k4v2_g128", 64, torch.bfloat16, 16384, True),
    ("kvarn_k4v2_g128", 256, torch.bfloat16, 16384, True),
    ("kvarn_k4v2_g64", 128, torch.bfloat16, 16384, True),
]


def _name(preset: str, d: int, dtype: torch.dtype, tokens: int, outliers: bool) -> str:
    return f"{preset}_d{d}_{str(dtype).split('.')[-1]}_{tokens}{'_outliers' if outliers else ''}"


def run(tag: str, save: Path) -> None:
    from benchmarks.kernels.bench_decode import graph_time_ms
    from kvarn_kernels.format import KVarNFormat
    from kvarn_kernels.quantize import quantize_into_cache

    save.mkdir(parents=True, exist_ok=True)
    for preset, d, dtype, tokens, outliers in SHAPES:
        fmt = KVarNFormat.from_preset(preset, d, dtype)
        gen = torch.Generator(device="cuda").manual_seed(tokens + d)
        k = torch.randn(tokens, 8, d, device="cuda", dtype=torch.float32, generator=gen)
        v = torch.randn(tokens, 8, d, device="cuda", dtype=torch.float32, generator=gen)
        if outliers:
            k[:, :, ::16] *= 50.0
            v[:, :, 3::16] *= 50.0
        k, v = k.to(dtype), v.to(dtype)
        n = tokens // fmt.group
        starts = torch.arange(n, device="cuda", dtype=torch.int32) * fmt.group
        blocks = starts // fmt.group
        cache = fmt.allocate(n, 8, "cuda")
        ms = graph_time_ms(lambda c=cache: quantize_into_cache(k, v, starts, blocks, c, fmt))
        name = _name(preset, d, dtype, tokens, outliers)
        torch.save(cache.cpu(), save / f"{tag}_{name}.pt")
        print(json.dumps({"tag": tag, "shape": name, "ms": round(ms, 4)}), flush=True)


def compare(save: Path, a: str, b: str) -> None:
    for shape in SHAPES:
        name = _name(*shape)
        ca = torch.load(save / f"{a}_{name}.pt")
        cb = torch.load(save / f"{b}_{name}.pt")
        print(json.dumps({"shape": name, "bytes": ca.numel(), "bytes_differ": int((ca != cb).sum())}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tags", nargs="+", help="this run's tag, or (with --compare) the two tags to compare")
    ap.add_argument("--save", type=Path, default=Path("/tmp/quantize_ab"))
    ap.add_argument("--compare", type=Path, default=None, help="the directory of two runs' caches to compare")
    args = ap.parse_args()
    if args.compare is not None:
        compare(args.compare, *args.tags)
    else:
        run(args.tags[0], args.save)


if __name__ == "__main__":
    main()
