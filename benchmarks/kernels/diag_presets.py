"""Kernel errors against the 16-bit floors per preset, head_dim and code conversion (bfloat16; session 13).

    PYTHONPATH=. python3 benchmarks/kernels/diag_presets.py   (GPU) -> one JSON line per (conversion, preset, head_dim)
"""
import json

import torch

from kvarn_kernels import attention
from kvarn_kernels import reference as ref
from kvarn_kernels.attention import chunk_attention, decode_attention
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.state import build_paged_kv
from kvarn_kernels.testing import sixteen_bit_chunk, sixteen_bit_decode, synthetic_kv


def run(preset, dtype, head_dim):
    hkv, n_rep = 2, 4
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    lens = [300, 48 * fmt.group + 77]
    kv = [synthetic_kv(n, hkv, head_dim, dtype, seed=i, device="cuda") for i, n in enumerate(lens)]
    state = build_paged_kv([a for a, _ in kv], [b for _, b in kv], fmt, quantize_into_cache)
    cu = torch.arange(3, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(2, hkv * n_rep, head_dim, device="cuda", dtype=dtype, generator=gen)
    exp = ref.paged_attention_ref(q, state, cu).float()
    res = {"floor": (sixteen_bit_decode(q, state) - exp).abs().max().item()}
    for s in (16, 4, 1, None):
        out = decode_attention(q, state, num_splits=s).float()
        res[f"s{s}"] = (out - exp).abs().max().item()
        res[f"s{s}_rel"] = ((out - exp).abs() - 2.0**-8 * exp.abs()).max().item()
    cu_q = torch.tensor([0, 5, 8], dtype=torch.int32, device="cuda")
    qc = torch.randn(8, hkv * n_rep, head_dim, device="cuda", dtype=dtype, generator=gen)
    kn = torch.randn(8, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    vn = torch.randn_like(kn)
    expc = ref.paged_attention_ref(qc, state, cu_q, kn, vn, cu_q).float()
    res["chunk_floor"] = (sixteen_bit_chunk(qc, state, cu_q, kn, vn, cu_q) - expc).abs().max().item()
    outc = chunk_attention(qc, kn, vn, cu_q, cu_q, 5, state).float()
    res["chunk"] = (outc - expc).abs().max().item()
    idx = (outc - expc).abs().flatten().argmax().item()
    res["chunk_at_value"] = expc.flatten()[idx].item()
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


cases = [("kvarn_k4v2_g128", 128), ("kvarn_k4v2_g128", 256), ("kvarn_k4v4_g64", 256), ("kvarn_k4v2_g64", 64),
         ("kvarn_k4v4_g64", 64)]
for mode in ("default", "plain"):
    if mode == "plain":
        attention.MAGIC_DTYPES = set()
    for preset, hd in cases:
        print(json.dumps({"mode": mode, "preset": preset, "hd": hd, **run(preset, torch.bfloat16, hd)}), flush=True)
