"""One decode-attention shape, run a few times: a target for Nsight Compute (ncu).

    PYTHONPATH=. ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        -k regex:_paged_attention_kernel -c 1 python benchmarks/kernels/profile_decode.py
"""

import argparse

import torch

from benchmarks.kernels.bench_decode import make_state
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--context", type=int, default=16384)
args = ap.parse_args()
fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, torch.bfloat16)
state = make_state(args.batch, args.context, 8, fmt, torch.bfloat16)
q = torch.randn(args.batch, 32, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    decode_attention(q, state)
torch.cuda.synchronize()
