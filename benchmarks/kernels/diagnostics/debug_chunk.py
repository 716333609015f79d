"""GPU diagnostics: chunk attention variants, one per process (an illegal access poisons the context); shapes_*
compare the float16 mantissa-OR path with plain conversion. Output:
benchmarks/kernels/results/gpu_tests/h100/2026-11-23_521f454_run2.log."""
import dataclasses
import subprocess
import sys

import torch

VARIANTS = ["shapes_magic", "shapes_nomagic", "base", "warps4", "nomagic", "hist0only", "nonew_hist", "rep1", "bf16",
            "d128"]


def shapes(magic: bool) -> None:
    """test_gpu_shapes' chunk case at head_dim 64/128, float16, with and without the mantissa-OR conversion."""
    sys.path.insert(0, "tests/kvarn_kernels")
    from test_gpu_shapes import chunk_case

    from kvarn_kernels import attention as A
    tuning = dataclasses.replace(A.TUNING, magic_dtypes=frozenset({A.tl.bfloat16, A.tl.float16} if magic
                                                                  else {A.tl.bfloat16}))
    for hd in (64, 128):
        a, e, cu = chunk_case(hd, tuning)
        err = (a.float() - e.float()).abs()
        bad = (err > 1e-2 + 1e-2 * e.float().abs()).sum().item()
        print(f"magic={magic} D={hd} max err {err.max().item():.4g} over-tol {bad} "
              f"per-seq max {[err[cu[i]:cu[i + 1]].max().item() for i in range(3)]}")


def run(variant: str) -> None:
    if variant.startswith("shapes"):
        return shapes(variant == "shapes_magic")
    sys.path.insert(0, "tests/kvarn_kernels")
    from test_attention import _cu, _state

    from kvarn_kernels import attention as A
    from kvarn_kernels import reference as ref
    dev = "cuda"
    dtype = torch.bfloat16 if variant == "bf16" else torch.float16
    D = 128 if variant == "d128" else 64
    hist, n_q, n_k = [0, 10, 64 + 7, 3 * 64], [5, 3, 17, 1], [5, 4, 17, 1]
    if variant == "hist0only":
        hist, n_q, n_k = [0], [5], [5]
    if variant == "nonew_hist":
        hist, n_q, n_k = [3 * 64], [4], [4]
    hq = 2 if variant == "rep1" else 6
    tuning = A.TUNING
    if variant == "warps4":
        tuning = dataclasses.replace(tuning, chunk_launch_options={"num_warps": 4, "num_stages": 2})
    if variant == "nomagic":  # plain code conversion
        tuning = dataclasses.replace(tuning, magic_dtypes=frozenset(), f16_asm=False)
    state = _state(hist, 2, D, dtype, dev)
    q = torch.randn(sum(n_q), hq, D, device=dev).to(dtype)
    k_new = torch.randn(sum(n_k), 2, D, device=dev).to(dtype)
    v_new = torch.randn(sum(n_k), 2, D, device=dev).to(dtype)
    cu_q, cu_k = _cu(n_q, dev), _cu(n_k, dev)
    expected = ref.paged_attention_ref(q, state, cu_q, k_new, v_new, cu_k)
    actual = A.chunk_attention(q, k_new, v_new, cu_q, cu_k, max(n_q), state, num_splits=1, tuning=tuning)
    torch.cuda.synchronize()
    print(variant, "max err", (actual.float() - expected.float()).abs().max().item())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        for v in VARIANTS:
            r = subprocess.run([sys.executable, __file__, v], capture_output=True, text=True, env={
                **__import__("os").environ, "CUDA_LAUNCH_BLOCKING": "1"})
            tail = (r.stdout + r.stderr).strip().splitlines()
            print(v, "rc", r.returncode, "|", " || ".join(tail[-2:]) if tail else "")
