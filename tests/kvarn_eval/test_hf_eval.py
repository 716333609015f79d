"""kvarn_eval.hf_eval: the simulated tile caches and codecs, and (slow) KVarNCache's accuracy on SmolLM2-135M."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvarn_eval.hf_eval import (
    SimulatedTileCache,
    agreement,
    chunked_scores,
    kivi_codec,
    kvarn_codec,
    kvarn_variant_codec,
    make_cache,
)
from kvarn_kernels.reference import synthetic_kv


def tiles(n: int, dtype: torch.dtype, group: int = 128, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = synthetic_kv(n * group, 2, dim, dtype, seed=3)
    return (x.view(n, group, 2, dim).transpose(1, 2).contiguous() for x in (k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_variant_codec_defaults_reproduce_the_kvarn_format(dtype):
    k, v = tiles(3, dtype)
    for got, want in zip(kvarn_variant_codec(4, 2)(k, v), kvarn_codec("kvarn_k4v2_g128")(k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kivi_codec_is_exact_on_its_grid():
    """Keys on a per-channel 4-bit grid and values on a per-token 2-bit grid come back unchanged."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 16, (1, 2, 128, 64), generator=g).float() * 0.5 - 1  # channel min -1, step 0.5
    k[:, :, 0], k[:, :, 1] = -1, 6.5  # every channel spans the full grid
    v = torch.randint(0, 4, (1, 2, 128, 64), generator=g).float() * 0.25
    v[..., 0], v[..., 1] = 0, 0.75
    k_hat, v_hat = kivi_codec(4, 2)(k, v)
    torch.testing.assert_close(k_hat, k, rtol=0, atol=0)
    torch.testing.assert_close(v_hat, v, rtol=0, atol=0)


def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_simulated_cache_with_identity_codec_is_the_16bit_cache():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 300), generator=torch.Generator().manual_seed(1))
    identity = SimulatedTileCache(lambda k, v: (k, v), group=64)
    got, _ = chunked_scores(model, ids, identity, chunk=50)
    want, _ = chunked_scores(model, ids, DynamicCache(), chunk=50)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@torch.no_grad()
def test_simulated_sink_sets_where_tiles_start():
    calls = []

    def codec(k, v):
        calls.append(k.shape[0])
        return k, v

    cache = SimulatedTileCache(codec, group=64, sink=0)
    cache.update(torch.zeros(1, 1, 130, 64), torch.zeros(1, 1, 130, 64), 0)
    assert calls == [2]  # tokens 0..127 form two tiles when there is no sink


def test_agreement_counts_identical_prefixes():
    got = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4]])
    want = torch.tensor([[1, 2, 3, 5], [1, 2, 3, 4]])
    assert agreement(got, want) == {"identical_prefix": 2.0, "match_fraction": 6 / 8}


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method 'k3' is unknown"):
        make_cache("k3", None)


@pytest.mark.slow
def test_smollm2_k4v2_perplexity_within_one_percent_of_16bit():
    """SmolLM2-135M-Instruct, 2048 Wikipedia tokens fed 64 per forward through the fused "kvarn" attention (so
    every later chunk attends to quantized tiles): kvarn_k4v2_g128 perplexity within 1 % of DynamicCache's."""
    import kvarn_hf  # noqa: F401
    from kvarn_eval.assets import fetch_text, load_model

    model, tokenizer = load_model("smollm2-135m", attn_implementation="kvarn")
    ids = tokenizer(fetch_text("wiki"), return_tensors="pt").input_ids[:, :2048]
    with torch.no_grad():
        nll_16, top_16 = chunked_scores(model, ids, make_cache("16-bit", model.config), 64)
        cache = make_cache("kvarn_k4v2_g128", model.config)
        nll_q, top_q = chunked_scores(model, ids, cache, 64)
    assert cache.fused and cache.layers[0].paging.next_block == (2047 - 128) // 128  # 14 tiles quantized
    delta = math.exp(float(nll_q.mean()) - float(nll_16.mean())) - 1
    assert 0 < delta < 0.01
    assert float((top_q == top_16).float().mean()) > 0.9


def test_demo_table_reports_compression_and_both_continuations():
    from kvarn_eval.demo import format_table

    rows = {
        "16-bit": {"bytes_per_token": 23040, "kv_bytes": 2048, "ppl": 20.0, "prefill_s": 1.0, "decode_tps": 20.0,
                   "text": "the reference"},
        "kvarn_k4v2_g128": {"bytes_per_token": 5130, "kv_bytes": 1024, "ppl": 20.1, "prefill_s": 2.0,
                            "decode_tps": 10.0, "text": "the kvarn text"},
    }
    table = format_table({"device": "cpu", "dtype": "float32", "preset": "kvarn_k4v2_g128", "prompt_tokens": 700,
                          "new_tokens": 48, "ppl_tokens": 1024, "chunk": 64, "rows": rows, "identical_prefix": 30})
    assert "4.49x" in table and "+0.50 %" in table and "30 of 48" in table
    assert "the reference" in table and "the kvarn text" in table
