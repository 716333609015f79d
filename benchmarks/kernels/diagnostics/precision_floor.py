"""Decode error of the Triton kernel against the 16-bit precision floor, on a GPU (GQA 8, the shape that once missed
atol = rtol = 2e-2). From the repository root:

    python benchmarks/kernels/diagnostics/precision_floor.py

Per query draw: the kernel's worst error as a multiple of the 2e-2 tolerance (and its location), the same for
FlashAttention-style attention over the dequantized history with 16-bit operands (`reference.sixteen_bit_decode`), and
both mean absolute errors, all against the float32 `reference.paged_attention_ref`. The figures in
benchmarks/kernels/results/ab/h100/2026-11-23_121a2c8.log ("diagnosis") came from this computation (an ad hoc copy
whose 16-bit
baseline was then moved into `kvarn_kernels.reference`); tests/kvarn_kernels/test_gpu_shapes.py asserts on it.
"""

from __future__ import annotations

import torch

from kvarn_kernels import reference as ref
from kvarn_kernels.attention import decode_attention
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.reference import sixteen_bit_decode, synthetic_kv
from kvarn_kernels.state import build_paged_kv


def main() -> None:
    for head_dim in (64, 128):
        hkv, n_rep, lens = 4, 8, [129, 1000, 4096 + 77]
        fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim, torch.bfloat16)
        kv = [synthetic_kv(n, hkv, head_dim, torch.bfloat16, seed=i, device="cuda") for i, n in enumerate(lens)]
        state = build_paged_kv([a for a, _ in kv], [b for _, b in kv], fmt, quantize_into_cache)
        cu = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(head_dim)
        for i in range(16):
            q = torch.randn(len(lens), hkv * n_rep, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            got = decode_attention(q, state).float()
            exp = ref.paged_attention_ref(q, state, cu).float()
            base = sixteen_bit_decode(q, state)
            tol = 2e-2 + 2e-2 * exp.abs()
            r_k, r_b = (got - exp).abs() / tol, (base - exp).abs() / tol
            idx = tuple(int(x) for x in torch.unravel_index(r_k.argmax(), r_k.shape))
            print(f"D{head_dim} draw {i}: kernel worst {r_k.max().item():.2f}x tol "
                  f"(abs {(got - exp).abs().max().item():.4f}) at {idx} got {got[idx].item():.4f} "
                  f"exp {exp[idx].item():.4f}; bf16 flash-like worst {r_b.max().item():.2f}x "
                  f"(abs {(base - exp).abs().max().item():.4f}); mean abs kernel {(got - exp).abs().mean().item():.2e} "
                  f"flash-like {(base - exp).abs().mean().item():.2e}", flush=True)


if __name__ == "__main__":
    main()
