"""Host-side work per decode step of KVarNCache vs DynamicCache, with the attention kernels stubbed out (CPU).

    python benchmarks/hf/host_ops.py [--layers 2,8] [--batch 2]

A tiny random Llama (the test suite's `tests/kvarn_hf/hf_models.py`) decodes one token per row after a 300-token
prefill; torch.profiler counts the top-level aten ops of one step, and the difference between two layer counts
splits them into a per-step part (KVarN: the placement of the step's new tokens) and a per-layer part. On a GPU
every op on a device tensor is a kernel launch; the kernels themselves are replaced by `torch.empty_like`, so only
the host work the cache adds is counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import kvarn_hf  # noqa: F401  (registers attn_implementation="kvarn")
from kvarn_hf import KVarNCache
from kvarn_kernels import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "kvarn_hf"))
from hf_models import ARCHS, tokens  # noqa: E402


def _stub_attention(q, state, *args, **kwargs):
    state.validate()
    return torch.empty_like(q)


def top_level_ops(kind: str, layers: int, batch: int) -> int:
    config_cls, model_cls, kwargs = ARCHS["llama"]
    config = config_cls(vocab_size=128, intermediate_size=128, num_hidden_layers=layers, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, **kwargs)
    config._attn_implementation = "kvarn" if kind == "kvarn" else "sdpa"
    model = model_cls(config).eval()
    cache = KVarNCache("kvarn_k4v2_g128", config=config) if kind == "kvarn" else DynamicCache(config=config)
    with torch.no_grad():
        model(tokens(300, batch=batch), past_key_values=cache)
        step = tokens(1, batch=batch, seed=5)
        for _ in range(3):
            model(step, past_key_values=cache)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(step, past_key_values=cache)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.layers.split(","))
    ops.paged_attention = _stub_attention
    print("| cache | aten ops per step | per layer |")
    print("|---|---|---|")
    for kind in ("kvarn", "dynamic"):
        a, b = top_level_ops(kind, lo, args.batch), top_level_ops(kind, hi, args.batch)
        per_layer = (b - a) / (hi - lo)
        print(f"| {kind} | {a - lo * per_layer:.0f} | {per_layer:.0f} |")


if __name__ == "__main__":
    main()
