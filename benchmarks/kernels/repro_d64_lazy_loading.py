"""Reproduce the head_dim-64 decode crash seen on an H100 ("an illegal instruction was encountered"), on a GPU.

    python benchmarks/kernels/repro_d64_lazy_loading.py

Each mode runs in a fresh process with CUDA_LAUNCH_BLOCKING=1: a decode of 2 sequences x 4173 tokens, then a decode
of 1 sequence x 1024 tokens, both head_dim 64 (bfloat16, 32 query / 8 KV heads) at 32 splits (the automatic choice of
the first; forced for the second). Session 8 (torch 2.11+cu130, triton 3.6): with CUDA's default lazy module loading
the second launch of that same kernel binary fails; with CUDA_MODULE_LOADING=EAGER, under compute-sanitizer
(memcheck, synccheck: no errors), or with either decode alone it passes. Prints one line per mode.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _child() -> None:
    import torch

    from benchmarks.kernels.bench_decode import make_state
    from kvarn_kernels.attention import decode_attention
    from kvarn_kernels.format import KVarNFormat

    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 64, torch.bfloat16)
    torch.manual_seed(0)
    steps = []
    try:
        for batch, ctx in ((2, 4096 + 77), (1, 1024)):
            state = make_state(batch, ctx, 8, fmt, torch.bfloat16)
            q = torch.randn(batch, 32, 64, device="cuda", dtype=torch.bfloat16)
            decode_attention(q, state, num_splits=32)
            torch.cuda.synchronize()
            steps.append(f"{batch}x{ctx} ok")
    except Exception as e:  # noqa: BLE001 (the point is to report any CUDA error)
        steps.append(f"FAILED: {str(e).splitlines()[0]}")
    print("; ".join(steps), flush=True)


def main() -> None:
    if "--child" in sys.argv:
        _child()
        return
    for mode in ("LAZY", "EAGER"):
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", CUDA_MODULE_LOADING=mode)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        print(f"CUDA_MODULE_LOADING={mode}: {lines[-1] if lines else out.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
