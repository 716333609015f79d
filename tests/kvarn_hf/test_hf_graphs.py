"""CUDA-graph decode (kvarn_hf.graphs): generate() routes decode steps through `DecodeGraphs`.

On CPU nothing is captured: the runner runs the same static steps (device buffers refilled per step, fixed history
bound) eagerly, so these tests check everything but the capture itself against the plain fused path, exactly
(the CPU path computes attention with the reference, which is bit-identical for both). test_hf_gpu.py replays real
graphs.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import GROUP, PRESET, make_model, tokens

from kvarn_hf import KVarNCache
from kvarn_hf.graphs import DecodeGraphs, bucket_tiles


def padded_batch():
    prompts = [tokens(150, seed=1), tokens(85, seed=2)]
    ids = torch.cat([torch.nn.functional.pad(p, (150 - p.shape[1], 0)) for p in prompts])
    return ids, (ids != 0).long()


def generate(model, ids, mask, cache, **kwargs):
    kwargs.setdefault("max_new_tokens", 90)
    kwargs.setdefault("output_logits", True)
    return model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                          return_dict_in_generate=True, **kwargs)


def assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


@pytest.mark.parametrize("k_frame", ["range", "sink-queries"])
def test_static_decode_steps_equal_the_eager_fused_path(k_frame):
    model = make_model("llama", "kvarn")
    ids, mask = padded_batch()
    eager = generate(model, ids, mask, KVarNCache(PRESET, decode_graphs=False, k_frame=k_frame))
    cache = KVarNCache(PRESET, decode_graphs=True, k_frame=k_frame)
    graphed = generate(model, ids, mask, cache)
    assert_same(graphed, eager)
    # 89 decode steps; a row completes a tile at 128 and 192 real tokens: row 0 (150 real) at step 42, row 1 (85)
    # at step 43. Those two run eagerly, the others statically (nothing is captured on CPU).
    assert cache._decoder.stats == {"replays": 0, "captures": 0, "static_eager": 87, "eager": 2}
    assert [layer.length for layer in cache.layers] == [239, 239] and cache.get_seq_length() == 239


def test_continuing_from_the_cache_with_graphs():
    model = make_model("llama", "kvarn")
    outputs = []
    for flag in (False, True):
        cache = KVarNCache(PRESET, decode_graphs=flag)
        first = generate(model, tokens(100), torch.ones(1, 100, dtype=torch.long), cache, max_new_tokens=40)
        more = torch.cat([first.sequences, tokens(25, seed=9)], dim=1)
        outputs.append(generate(model, more, torch.ones_like(more), cache, max_new_tokens=40))
    assert_same(*outputs)


def test_beam_search_turns_graphs_off_and_stays_exact():
    """Beams reorder the cache every step: the runner steps aside for good after the first reorder."""
    model = make_model("llama", "kvarn")
    ids, mask = padded_batch()
    eager = generate(model, ids[:1], mask[:1], KVarNCache(PRESET, decode_graphs=False), num_beams=3,
                     max_new_tokens=30, output_logits=False)
    cache = KVarNCache(PRESET, decode_graphs=True)
    beams = generate(model, ids[:1], mask[:1], cache, num_beams=3, max_new_tokens=30, output_logits=False)
    assert torch.equal(beams.sequences, eager.sequences)
    assert cache._graphs_off and not cache.wants_decode_graphs(model)


def test_when_generate_uses_the_runner():
    ids, mask = padded_batch()
    fused, dense = make_model("llama", "kvarn"), make_model("llama", "sdpa")
    # Auto (None) means CUDA only; disable_compile=True and decode_graphs=False turn it off; the dense path never.
    for model, cache, kwargs in ((fused, KVarNCache(PRESET), {}),
                                 (fused, KVarNCache(PRESET, decode_graphs=True), {"disable_compile": True}),
                                 (fused, KVarNCache(PRESET, decode_graphs=False), {}),
                                 (dense, KVarNCache(PRESET, decode_graphs=True), {})):
        generate(model, ids, mask, cache, max_new_tokens=3, **kwargs)
        assert cache._decoder is None
    assert not hasattr(fused, "_kvarn_graph_cache")


def test_calls_a_graph_cannot_serve_run_eagerly():
    """Hidden states, chunks and a foreign cache go to the model itself, with the same results."""
    model = make_model("llama", "kvarn")
    ids = tokens(140)
    cache = KVarNCache(PRESET, config=model.config, decode_graphs=True)
    plain = KVarNCache(PRESET, config=model.config, decode_graphs=False)
    runner = cache.decode_graphs_for(model)
    assert isinstance(runner, DecodeGraphs) and cache.decode_graphs_for(model) is runner
    for c in (cache, plain):
        model(ids, past_key_values=c)
    pos = torch.tensor([[140]])
    step = tokens(1, seed=4)
    out = runner(input_ids=step, position_ids=pos, past_key_values=cache, output_hidden_states=True)
    want = model(step, position_ids=pos, past_key_values=plain, output_hidden_states=True)
    assert out.hidden_states is not None and torch.equal(out.logits, want.logits)
    chunk = tokens(3, seed=5)
    pos3 = torch.arange(141, 144)[None]
    torch.testing.assert_close(runner(input_ids=chunk, position_ids=pos3, past_key_values=cache).logits,
                               model(chunk, position_ids=pos3, past_key_values=plain).logits, rtol=0, atol=0)
    step = tokens(1, seed=6)
    got = runner(input_ids=step, position_ids=torch.tensor([[144]]), past_key_values=cache).logits
    assert torch.equal(got, model(step, position_ids=torch.tensor([[144]]), past_key_values=plain).logits)
    assert runner.stats == {"replays": 0, "captures": 0, "static_eager": 1, "eager": 2}


def test_history_buckets():
    assert [bucket_tiles(t, 10_000) for t in (0, 16, 17, 21, 33, 64, 65, 200)] == [16, 16, 20, 24, 40, 64, 80, 224]
    assert bucket_tiles(100, 90) == 100  # never below the history itself
    assert bucket_tiles(70, 72) == 72  # capped at the block table
    sizes = [bucket_tiles(t, 10_000) for t in range(1, 5000)]
    assert all(b >= t and b <= 1.25 * max(t, 16) for t, b in zip(range(1, 5000), sizes, strict=True))


def test_decode_graphs_option_is_checked():
    with pytest.raises(ValueError, match="decode_graphs must be None"):
        KVarNCache(PRESET, decode_graphs="yes")
    assert GROUP == 64


def test_capture_setting_is_read_when_used(monkeypatch):
    """KVARN_NO_CAPTURE is read at each decision (not at import), an explicit capture= overrides it, and nothing is
    captured off CUDA. The paging is told a CUDA device without any tensor on it (the property reads only that)."""
    model = make_model("llama", "kvarn")
    cache = KVarNCache(PRESET, config=model.config, decode_graphs=True)
    runners = {flag: DecodeGraphs(model, cache, capture=flag) for flag in (None, True, False)}
    monkeypatch.setattr(cache._paging, "device", torch.device("cuda"))
    monkeypatch.delenv("KVARN_NO_CAPTURE", raising=False)
    assert [runners[f].capture for f in (None, True, False)] == [True, True, False]
    monkeypatch.setenv("KVARN_NO_CAPTURE", "1")
    assert [runners[f].capture for f in (None, True, False)] == [False, True, False]
    monkeypatch.setenv("KVARN_NO_CAPTURE", "0")
    assert runners[None].capture
    monkeypatch.setattr(cache._paging, "device", torch.device("cpu"))
    assert not any(r.capture for r in runners.values())
    with pytest.raises(ValueError, match="capture must be None"):
        DecodeGraphs(model, cache, capture="no")
