"""Why test_decode_is_repeatable_and_as_precise_as_16bit_attention[96] may fail: the decode kernel's error against the
float32 reference beside `sixteen_bit_decode`'s (the test's floor), as is and rounded to the output dtype, at
head_dim 96 and 128, through the Triton interpreter on a CPU (small shapes; a GPU run is the real check):

    python benchmarks/kernels/diagnostics/precision_floor_96.py
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kvarn_kernels import reference as ref  # noqa: E402
from kvarn_kernels.attention import decode_attention  # noqa: E402
from kvarn_kernels.format import KVarNFormat  # noqa: E402
from kvarn_kernels.quantize import quantize_into_cache  # noqa: E402
from kvarn_kernels.state import build_paged_kv  # noqa: E402


def main() -> None:
    lens, hkv, n_rep = [129, 300], 2, 4
    print("head_dim | kernel max / mean | floor max / mean | floor rounded to bf16 max / mean")
    for head_dim in (96, 128):
        fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", head_dim, torch.bfloat16)
        kv = [ref.synthetic_kv(n, hkv, head_dim, torch.bfloat16, seed=i) for i, n in enumerate(lens)]
        state = build_paged_kv([k for k, _ in kv], [v for _, v in kv], fmt, quantize_into_cache)
        gen = torch.Generator().manual_seed(head_dim)
        cu = torch.arange(len(lens) + 1, dtype=torch.int32)
        errs, floors, rounded = [], [], []
        for _ in range(3):
            q = torch.randn(len(lens), hkv * n_rep, head_dim, dtype=torch.bfloat16, generator=gen)
            expected = ref.paged_attention_ref(q, state, cu).float()
            sixteen = ref.sixteen_bit_decode(q, state)
            errs.append((decode_attention(q, state).float() - expected).abs())
            floors.append((sixteen - expected).abs())
            rounded.append((sixteen.to(q.dtype).float() - expected).abs())
        cols = [torch.stack(x) for x in (errs, floors, rounded)]
        print(head_dim, " | ".join(f"{c.max():.4f} / {c.mean():.2e}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
