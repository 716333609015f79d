"""One decode-attention (or prefill-quantize) shape, run a few times: a target for Nsight Compute (ncu).

    PYTHONPATH=. ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        -k regex:_paged_attention_kernel -c 1 python benchmarks/kernels/profiling/profile_decode.py
    PYTHONPATH=. ncu ... -k regex:_quantize_tiles_kernel -c 1 python benchmarks/kernels/profiling/profile_decode.py \
        --quantize --context 16384
Per-instruction stall samples: add `--section SourceCounters --export F`, then
`ncu --import F.ncu-rep --page source --print-source sass --csv`.
"""

import argparse

import torch

from benchmarks.kernels.bench_decode import make_state
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--context", type=int, default=16384)
ap.add_argument("--quantize", action="store_true", help="profile the quantize kernel on a prefill of --context tokens")
args = ap.parse_args()
fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, torch.bfloat16)
if args.quantize:
    src = torch.randn(args.context, 8, 128, device="cuda", dtype=torch.bfloat16)
    starts = torch.arange(args.context // fmt.group, device="cuda", dtype=torch.int32) * fmt.group
    cache = fmt.allocate(starts.numel(), 8, "cuda")
    for _ in range(3):
        quantize_into_cache(src, src, starts, starts // fmt.group, cache, fmt)
else:
    state = make_state(args.batch, args.context, 8, fmt, torch.bfloat16)
    q = torch.randn(args.batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        decode_attention(q, state)
torch.cuda.synchronize()
