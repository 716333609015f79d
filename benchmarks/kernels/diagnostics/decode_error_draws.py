"""Worst decode errors over 30 seeded query draws, against the limit the GPU test allows, per test configuration.

    PYTHONPATH=/path/to/copy:. python benchmarks/kernels/diagnostics/decode_error_draws.py   # a kvarn_kernels copy \
        first

The shapes of `tests/kvarn_kernels/test_attention.py::test_decode_matches_reference`; each line prints the three
worst (error / max(0.02, 2 x 16-bit floor), error, floor, seed). 2026-11-23 (58f1ce6) ran it for the kernels before
and after
the work-unit split change on an H100: identical lines (benchmarks/kernels/results/ab/h100/2026-11-23_58f1ce6.log).
"""

import sys

import torch

sys.path.insert(0, "tests/kvarn_kernels")
from test_attention import _cu, _state  # noqa: E402

import kvarn_kernels  # noqa: E402
from kvarn_kernels import reference as ref  # noqa: E402
from kvarn_kernels.attention import decode_attention  # noqa: E402
from kvarn_kernels.reference import sixteen_bit_decode  # noqa: E402


def main() -> None:
    print(kvarn_kernels.__file__)
    lens = [5, 64, 67, 128, 4 * 64 + 17]
    for n_rep, splits in ((1, 1), (3, 2), (4, 3)):
        for dtype in (torch.bfloat16, torch.float16):
            state = _state(lens, 2, 64, dtype, "cuda")
            worst = []
            for seed in range(30):
                gen = torch.Generator().manual_seed(seed)
                q = torch.randn(len(lens), 2 * n_rep, 64, generator=gen).cuda().to(dtype)
                e = ref.paged_attention_ref(q, state, _cu([1] * len(lens), "cuda")).float()
                err = (decode_attention(q, state, num_splits=splits).float() - e).abs().max().item()
                floor = (sixteen_bit_decode(q, state) - e).abs().max().item()
                worst.append((round(err / max(0.02, 2 * floor), 3), round(err, 4), round(floor, 4), seed))
            worst.sort()
            print(n_rep, splits, dtype, "worst err/allowed:", worst[-3:], flush=True)


if __name__ == "__main__":
    main()
