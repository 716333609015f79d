"""KVarNCache inside tiny random models of every supported architecture, head_dim and dtype.

16-bit parts are checked against DynamicCache, quantized histories against `SimulatedTileCache` (the same tiles
quantized and dequantized by the kernel-core reference functions). The dense path is checked bit for bit; the fused
path computes attention differently (float32 from the packed tiles), so it is checked with tolerances.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import ARCHS, CHUNKS_16BIT, CHUNKS_QUANT, GROUP, PRESET, make_model, max_diff, run, tokens
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvarn_eval.hf_eval import SimulatedTileCache, kvarn_codec
from kvarn_hf import KVarNCache, KVarNLayer


@pytest.mark.parametrize("attn", ["sdpa", "kvarn"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_16bit_prefix_matches_dynamic_cache(arch, attn):
    """Before the first tile fills, the cache holds 16-bit tokens only: DynamicCache's results exactly."""
    model = make_model(arch, attn)
    got = run(model, KVarNCache(PRESET, config=model.config), CHUNKS_16BIT)
    want = run(model, DynamicCache(config=model.config), CHUNKS_16BIT)
    assert max_diff(got, want) <= (0 if attn == "sdpa" else 1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_history_matches_reference(arch):
    """Dense path: bit-identical to the reference tile simulation. Fused path: as close as float32 noise allows
    (a 1e-7 change in a key can move a 4-bit code by one step), far closer than either is to the 16-bit cache."""
    dense, fused = make_model(arch, "sdpa"), make_model(arch, "kvarn")
    want = run(dense, SimulatedTileCache(kvarn_codec(PRESET), GROUP, dense.config), CHUNKS_QUANT)
    exact = run(dense, DynamicCache(config=dense.config), CHUNKS_QUANT)
    got_dense = run(dense, KVarNCache(PRESET, config=dense.config), CHUNKS_QUANT)
    got_fused = run(fused, KVarNCache(PRESET, config=fused.config), CHUNKS_QUANT)
    assert max_diff(got_dense, want) == 0
    quant_error = max_diff(want[1:], exact[1:])
    assert quant_error > 1e-3  # the test does reach quantized history
    assert max_diff(got_fused, want) < 0.1 * quant_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_half_precision_models(arch, dtype):
    dense, fused = make_model(arch, "sdpa", dtype), make_model(arch, "kvarn", dtype)
    assert max_diff(run(dense, KVarNCache(PRESET, config=dense.config), CHUNKS_16BIT),
                    run(dense, DynamicCache(), CHUNKS_16BIT)) == 0
    want = run(dense, SimulatedTileCache(kvarn_codec(PRESET), GROUP), CHUNKS_QUANT)
    assert max_diff(run(dense, KVarNCache(PRESET, config=dense.config), CHUNKS_QUANT), want) == 0
    got = run(fused, KVarNCache(PRESET, config=fused.config), CHUNKS_QUANT)
    assert all(torch.isfinite(x).all() for x in got)
    scale = max(float(x.abs().max()) for x in want)
    assert max_diff(got, want) < 0.05 * scale  # half-precision attention in a different order


def test_gemma3_sliding_layers_keep_a_16bit_window():
    """Gemma-3: the sliding layer is transformers' 16-bit rolling window, the full layer holds KVarN tiles."""
    for attn in ("sdpa", "kvarn"):
        model = make_model("gemma3", attn)
        cache = KVarNCache(PRESET, config=model.config)
        assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and isinstance(cache.layers[1], KVarNLayer)
        out = model.generate(tokens(40), max_new_tokens=2 * GROUP + 40, do_sample=False, past_key_values=cache)
        assert out.shape[1] == 40 + 2 * GROUP + 40
        assert cache.layers[0].keys.shape[2] < model.config.sliding_window  # the window rolled
        assert cache.layers[1].paging.next_block == 2  # the full layer quantized two tiles


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_head_dims_64_96_and_256_serve_generate(arch):
    model = make_model(arch, "kvarn")
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert head_dim == {"llama": 64, "phi3": 96, "gemma3": 256}[arch]
    cache = KVarNCache("kvarn_k4v4_g128", config=model.config)
    model.generate(tokens(300), max_new_tokens=5, do_sample=False, past_key_values=cache)
    layer = next(x for x in cache.layers if isinstance(x, KVarNLayer))
    assert layer.fmt.head_dim == head_dim and layer.fmt.group == 128 and cache.get_seq_length() == 304
