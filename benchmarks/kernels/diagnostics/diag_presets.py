"""Kernel errors against the 16-bit floors per preset, head_dim and code conversion (bfloat16; 2026-11-24 (4bb7806)).

    PYTHONPATH=. python3 benchmarks/kernels/diagnostics/diag_presets.py   (GPU) -> one JSON line per (conversion, \
        preset, head_dim)
"""
import dataclasses
import json
import sys

import torch

from kvarn_kernels import attention
from kvarn_kernels import reference as ref
from kvarn_kernels.attention import chunk_attention, decode_attention
from kvarn_kernels.reference import sixteen_bit_chunk, sixteen_bit_decode

sys.path.insert(0, "tests/kvarn_kernels")
from test_gpu_shapes import preset_case  # noqa: E402  (the GPU test's inputs: its bounds cite these figures)


def run(preset, dtype, head_dim, tuning):
    state, q, cu, (qc, kn, vn, cu_q, max_q) = preset_case(preset, dtype, head_dim)
    exp = ref.paged_attention_ref(q, state, cu).float()
    res = {"floor": (sixteen_bit_decode(q, state) - exp).abs().max().item()}
    for s in (16, 4, 1, None):
        out = decode_attention(q, state, num_splits=s, tuning=tuning).float()
        res[f"s{s}"] = (out - exp).abs().max().item()
        res[f"s{s}_rel"] = ((out - exp).abs() - 2.0**-8 * exp.abs()).max().item()
    expc = ref.paged_attention_ref(qc, state, cu_q, kn, vn, cu_q).float()
    res["chunk_floor"] = (sixteen_bit_chunk(qc, state, cu_q, kn, vn, cu_q) - expc).abs().max().item()
    outc = chunk_attention(qc, kn, vn, cu_q, cu_q, max_q, state, tuning=tuning).float()
    res["chunk"] = (outc - expc).abs().max().item()
    idx = (outc - expc).abs().flatten().argmax().item()
    res["chunk_at_value"] = expc.flatten()[idx].item()
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


cases = [("kvarn_k4v2_g128", 128), ("kvarn_k4v2_g128", 256), ("kvarn_k4v4_g64", 256), ("kvarn_k4v2_g64", 64),
         ("kvarn_k4v4_g64", 64)]
# "plain": codes converted without the mantissa-OR path.
for mode, tuning in (("default", attention.TUNING),
                     ("plain", dataclasses.replace(attention.TUNING, magic_dtypes=frozenset()))):
    for preset, hd in cases:
        print(json.dumps({"mode": mode, "preset": preset, "hd": hd, **run(preset, torch.bfloat16, hd, tuning)}),
              flush=True)
