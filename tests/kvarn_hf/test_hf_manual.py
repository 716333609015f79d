"""KVarNCache driven by hand as DynamicCache users drive theirs: reused across models, built without a config for a
model with sliding-window layers, saved and loaded after a forward with autograd on, fed a left-padded batch."""

from __future__ import annotations

import io

import pytest
import torch
import transformers
from hf_models import PRESET, make_model, max_diff, tokens
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvarn_hf import KVarNCache, KVarNLayer

ATTN = ["sdpa", "kvarn"]


def llama(attn: str, dtype: torch.dtype = torch.float32, **changes) -> transformers.LlamaForCausalLM:
    """make_model("llama")'s tiny Llama (2 layers, 2 KV heads of head_dim 64) with some settings changed."""
    kwargs = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2) | changes
    config = transformers.LlamaConfig(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


OTHER_MODELS = {
    "more layers": (dict(num_hidden_layers=3), torch.float32, "2 layers but the model has 3"),
    "fewer layers": (dict(num_hidden_layers=1), torch.float32, "2 layers but the model has 1"),
    "head_dim": (dict(head_dim=128), torch.float32, "head_dim 128"),
    "kv heads": (dict(num_key_value_heads=1), torch.float32, "KV heads 1"),
    "dtype": ({}, torch.bfloat16, "bfloat16"),
}


@pytest.mark.parametrize("with_config", [False, True])
@pytest.mark.parametrize("other", list(OTHER_MODELS))
@pytest.mark.parametrize("attn", ATTN)
def test_a_filled_cache_refuses_another_model(attn, other, with_config):
    """A cache filled by one model and handed to a model of other shape, by forward or by generate, raises a
    ValueError naming what differs and what to do; after reset() it serves the new model like a new cache."""
    first = llama(attn)
    changes, dtype, what = OTHER_MODELS[other]
    second = llama(attn, dtype, **changes)
    cache = KVarNCache(PRESET, config=first.config if with_config else None)
    ids = tokens(155)
    first(ids[:, :150], past_key_values=cache)
    for call in (lambda: second(ids[:, 150:], past_key_values=cache),
                 lambda: second.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                         past_key_values=cache)):
        with pytest.raises(ValueError, match=what) as error:
            call()
        assert "KVarNCache()" in str(error.value) and "reset()" in str(error.value)
    cache.reset()
    torch.testing.assert_close(second(ids, past_key_values=cache).logits,
                               second(ids, past_key_values=KVarNCache(PRESET)).logits, rtol=0, atol=0)


def test_updates_that_do_not_fit_a_filled_cache_are_refused():
    """The same checks at the cache's own update(), for callers without a model."""
    cache = KVarNCache(PRESET, config=llama("sdpa").config)
    k = torch.zeros(1, 2, 10, 64)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    for bad, match in ((torch.zeros(1, 2, 3, 128), "head_dim 128"), (torch.zeros(1, 1, 3, 64), "KV heads 1"),
                       (torch.zeros(1, 2, 3, 64, dtype=torch.float16), "float16"),
                       (torch.zeros(2, 2, 3, 64), "batch 2")):
        with pytest.raises(ValueError, match=match):
            cache.update(bad, bad, 0)
    with pytest.raises(ValueError, match="layer 2"):
        cache.update(k, k, 2)


@pytest.mark.parametrize("attn", ATTN)
def test_a_config_less_cache_adapts_to_sliding_window_layers_at_the_first_forward(attn):
    """Gemma-3 driven by hand with KVarNCache(): the first forward gives the cache the model's layer types, so the
    sliding layer keeps transformers' 16-bit window instead of being quantized as full attention."""
    model = make_model("gemma3", attn)
    cache, built = KVarNCache(PRESET), KVarNCache(PRESET, config=model.config)
    ids = tokens(200)
    got = [model(ids[:, :150], past_key_values=cache).logits, model(ids[:, 150:], past_key_values=cache).logits]
    want = [model(ids[:, :150], past_key_values=built).logits, model(ids[:, 150:], past_key_values=built).logits]
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and isinstance(cache.layers[1], KVarNLayer)
    assert cache.fused == (attn == "kvarn")
    assert max_diff(got, want) == 0


def test_a_cache_filled_without_a_model_cannot_later_serve_sliding_layers():
    """Filled through update() alone, a config-less cache quantized every layer: a Gemma-3 model is refused."""
    model = make_model("gemma3")
    cache = KVarNCache(PRESET)
    k = torch.zeros(1, 1, 5, 256)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    with pytest.raises(ValueError, match="sliding-window layers were quantized"):
        model(tokens(5), past_key_values=cache)


@pytest.mark.parametrize("attn", ATTN)
def test_batch_size(attn):
    model = make_model("llama", attn)
    cache = KVarNCache(PRESET)
    assert cache.batch_size == -1
    model(tokens(20, batch=3), past_key_values=cache)
    assert cache.batch_size == 3
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.batch_size == 2


@pytest.mark.parametrize("attn", ATTN)
def test_save_and_load_after_a_forward_with_grad(attn):
    """torch.save / torch.load of a cache filled with autograd on, then another forward (as with DynamicCache): the
    cache holds no autograd history, and the loaded copy continues exactly like the original."""
    model = make_model("llama", attn)
    ids = tokens(200)
    for make in (DynamicCache, lambda: KVarNCache(PRESET)):
        cache = make()
        with torch.enable_grad():
            model(ids[:, :150], past_key_values=cache)
        buffer = io.BytesIO()
        torch.save(cache, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.enable_grad():
            got = model(ids[:, 150:], past_key_values=loaded).logits
        torch.testing.assert_close(got, model(ids[:, 150:], past_key_values=cache).logits, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_a_manual_left_padded_loop_learns_the_padding_from_the_mask(attn):
    """A left-padded batch fed by hand with its attention mask and no set_padding(): the padded row stores and
    predicts what it does alone (before, its padding entered the tiles: log-prob errors ~1e-2)."""
    model = make_model("llama", attn)
    pad, length = 70, 300
    ids = tokens(length, batch=2)
    ids[1, :pad] = 0
    mask = (ids != 0).long()
    mask[0] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() numbers a left-padded row
    batched, alone = KVarNCache(PRESET), KVarNCache(PRESET)
    got, want, pos = [], [], 0
    for n in (170, 1, 1, 128):
        got.append(model(ids[:, pos : pos + n], attention_mask=mask[:, : pos + n],
                         position_ids=positions[:, pos : pos + n], past_key_values=batched).logits[1])
        start = max(pos, pad)
        want.append(model(ids[1:, start : pos + n], past_key_values=alone).logits[0])
        got[-1] = got[-1][start - pos :]
        pos += n
    assert max_diff(got, want) < 1e-4
