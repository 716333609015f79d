"""model.generate with KVarNCache: every decoding mode, left padding, continuation, assisted decoding.

Token sequences are compared with `SimulatedTileCache` (the reference tile simulation) or with unpadded / plain
runs of KVarNCache itself; both the dense (sdpa) and the fused (kvarn) attention paths run every test. The dense
path must reproduce them token for token. The fused path sums attention in another order (float32 straight from the
packed tiles), and a 1e-7 change in a key can move a code across a rounding boundary and, tokens later, flip a
near-tied argmax of these random models; so there the first tokens must agree (its numerics are checked on logits in
test_hf_models.py, its batch edits are the dense path's).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import GROUP, PRESET, make_model, tokens
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from kvarn_eval.hf_eval import SimulatedTileCache, kvarn_codec
from kvarn_hf import KVarNCache
from kvarn_hf.paging import Paging

ATTN = ["sdpa", "kvarn"]


def reference():
    return SimulatedTileCache(kvarn_codec(PRESET), GROUP)


def assert_agree(attn, got, want, start):
    """The new tokens (from column `start`) of two generations agree: all of them (dense) or the first 8 (fused)."""
    assert got.shape == want.shape
    end = None if attn == "sdpa" else start + 8
    assert torch.equal(got[:, start:end], want[:, start:end])


def generate(model, ids, cache, **kwargs):
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, past_key_values=cache, **kwargs)


@pytest.mark.parametrize("attn", ATTN)
def test_greedy_beam_and_sampling_match_the_reference(attn):
    model = make_model("llama", attn)
    prompt = tokens(150)
    assert_agree(attn, generate(model, prompt, KVarNCache(PRESET), max_new_tokens=60),
                 generate(model, prompt, reference(), max_new_tokens=60), 150)
    assert_agree(attn, generate(model, prompt, KVarNCache(PRESET), max_new_tokens=30, num_beams=3),
                 generate(model, prompt, reference(), max_new_tokens=30, num_beams=3), 150)
    sampled = []
    for cache in (KVarNCache(PRESET), reference()):
        torch.manual_seed(1)
        sampled.append(generate(model, prompt, cache, max_new_tokens=40, do_sample=True, num_return_sequences=3))
    assert sampled[0].shape == (3, 190)
    assert_agree(attn, *sampled, 150)


@pytest.mark.parametrize("attn", ATTN)
def test_left_padded_rows_generate_what_they_generate_alone(attn):
    model = make_model("llama", attn)
    prompts = [tokens(150, seed=1), tokens(85, seed=2), tokens(10, seed=3)]  # padding 0, 65 (> G) and 140
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0)) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in prompts])
    batched = generate(model, ids, KVarNCache(PRESET), attention_mask=mask, max_new_tokens=80)[:, width:]
    for row, prompt in zip(batched, prompts, strict=True):
        alone = generate(model, prompt, KVarNCache(PRESET), max_new_tokens=80)[:, prompt.shape[1] :]
        assert_agree(attn, row[None], alone, 0)


@pytest.mark.parametrize("attn", ATTN)
def test_continuing_a_conversation_from_the_cache(attn):
    model = make_model("llama", attn)
    outputs = []
    for cache in (KVarNCache(PRESET), reference()):
        first = generate(model, tokens(100), cache, max_new_tokens=30)
        second = torch.cat([first, tokens(25, seed=9)], dim=1)
        outputs.append(generate(model, second, cache, max_new_tokens=30))
        assert cache.get_seq_length() == outputs[-1].shape[1] - 1
    assert_agree(attn, *outputs, 155)


@pytest.mark.parametrize("attn", ATTN)
def test_assisted_decoding_equals_plain_greedy(attn, monkeypatch):
    """The main model's cache is cropped after rejected drafts, also right after a tile was completed."""
    restores = []
    crop = Paging.crop

    def counting(self, remove):
        rows, slots = crop(self, remove)
        restores.append(rows.numel())
        return rows, slots

    monkeypatch.setattr(Paging, "crop", counting)
    model, assistant = make_model("llama", attn), make_model("llama", attn, seed=5)
    prompt = tokens(120)
    plain = generate(model, prompt, KVarNCache(PRESET), max_new_tokens=100)
    assisted = generate(model, prompt, KVarNCache(PRESET), max_new_tokens=100, assistant_model=assistant)
    assert_agree(attn, plain, assisted, 120)
    assert len(restores) > 10 and sum(restores) >= 1  # crops happened, one reopened a just-completed tile


@pytest.mark.parametrize("attn", ATTN)
def test_cache_implementation_kvarn(attn):
    model = make_model("llama", attn)
    prompt = tokens(150)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         cache_implementation="kvarn", cache_config={"preset": PRESET}, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, KVarNCache) and cache.preset == PRESET and cache.fused == (attn == "kvarn")
    assert torch.equal(out.sequences, generate(model, prompt, KVarNCache(PRESET), max_new_tokens=20))


def test_generate_with_the_sink_query_k_frame():
    """cache_config={"k_frame": "sink-queries"} reaches the cache; a fused generation over quantized tiles (300
    tokens: two tiles per row) runs with it and starts like the tile-only rule."""
    model = make_model("llama", "kvarn")
    prompt = tokens(300)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         cache_implementation="kvarn", cache_config={"preset": PRESET, "k_frame": "sink-queries"},
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache._paging.k_frame == "sink-queries" and cache.layers[0].query_energy is not None
    assert_agree("kvarn", out.sequences, generate(model, prompt, KVarNCache(PRESET), max_new_tokens=20), 300)


def test_kvarn_attention_without_a_kvarn_cache_is_plain_attention():
    """A "kvarn" model still runs with DynamicCache or no cache (dense fallback), identical to sdpa."""
    sdpa, kvarn = make_model("llama", "sdpa"), make_model("llama", "kvarn")
    ids = tokens(50, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    for cache in (None, DynamicCache()):
        got = kvarn(ids, attention_mask=mask, past_key_values=cache).logits
        want = sdpa(ids, attention_mask=mask, past_key_values=None if cache is None else DynamicCache()).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class StopAt(StoppingCriteria):
    """Ends generation at `length` tokens: draft lengths follow max_new_tokens, this keeps the run short."""

    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)


def drafting(assistant, tokens_per_draft):
    """The assistant drafts `tokens_per_draft` tokens every time (transformers reads these from the assistant's own
    generation config, not from generate()'s arguments; a confidence threshold would cut drafts short)."""
    assistant.generation_config.update(num_assistant_tokens=tokens_per_draft, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)
    return assistant


@pytest.mark.parametrize("attn", ATTN)
def test_assisted_decoding_with_drafts_longer_than_a_tile(attn, monkeypatch):
    """200-token drafts (capped at the 69 tokens left): the first verification forward (126 prompt + 69 drafts)
    completes two tiles and its rejected drafts are cropped back into the first of them; each token still attends
    as in plain greedy decoding."""
    crops = []
    crop = Paging.crop

    def recording(self, remove):
        copies = int((self.shadow_hi - self.shadow_lo).max())
        rows, slots = crop(self, remove)
        crops.append((copies, slots.tolist()))
        return rows, slots

    monkeypatch.setattr(Paging, "crop", recording)
    model, assistant = make_model("llama", attn), drafting(make_model("llama", attn, seed=5), 200)
    prompt = tokens(126)
    kwargs = dict(max_new_tokens=70, stopping_criteria=StoppingCriteriaList([StopAt(126 + 8)]))
    plain = generate(model, prompt, KVarNCache(PRESET), **kwargs)
    assisted = generate(model, prompt, KVarNCache(PRESET), assistant_model=assistant, **kwargs)
    assert assisted.shape[1] >= 126 + 8
    assert_agree(attn, plain, assisted[:, : plain.shape[1]], 126)
    assert crops[0] == (2, [0])  # tiles 0 and 1 had 16-bit copies; tile 0 was reopened


def agree_until_a_near_tie(plain, assisted, start, max_logit_diff):
    """Two greedy generations (return_dict_in_generate, output_logits) agree token for token, with logits within
    `max_logit_diff`, until they end or until a step where the first one's top-2 logits are within 10x that (a near
    tie that float rounding may flip); returns (identical tokens, largest logit difference over them)."""
    n = min(plain.sequences.shape[1], assisted.sequences.shape[1])  # a stopping criterion may let one run further
    same = int((plain.sequences[:, :n] == assisted.sequences[:, :n])[0, start:].long().cumprod(0).sum())
    diff = max((float((a - b).abs().max()) for a, b in zip(plain.logits[:same], assisted.logits[:same], strict=False)),
               default=0.0)
    assert diff < max_logit_diff
    if same < n - start:
        top = plain.logits[same][0].topk(2).values
        assert float(top[0] - top[1]) < 10 * max_logit_diff
    return same, diff


@pytest.mark.parametrize("attn", ATTN)
def test_assisted_decoding_by_the_model_itself_accepts_long_drafts(attn):
    """The model as its own assistant (16-bit DynamicCache drafts): most of each 200-token draft is accepted, so the
    accepted tokens' logits come from verification forwards that span tiles (the first one holds the prompt too:
    generate() drops an all-ones mask, the prompt length comes from what it records). They are plain greedy
    decoding's up to float rounding, which the quantizer can amplify (a key computed in a batch of tokens may round
    one code the other way: ~1e-3 here, against ~7e-2 when the forward's tiles stay 16-bit for its later tokens)."""
    model = make_model("llama", attn)
    prompt = tokens(150)  # tile 0 completes inside the prompt (which attends in 16-bit), tile 1 at 192 tokens
    kwargs = dict(max_new_tokens=120, output_logits=True, return_dict_in_generate=True,
                  stopping_criteria=StoppingCriteriaList([StopAt(150 + 60)]))
    plain = generate(model, prompt, KVarNCache(PRESET), **kwargs)
    assisted = generate(model, prompt, KVarNCache(PRESET), assistant_model=drafting(model, 200), **kwargs)
    same, _ = agree_until_a_near_tie(plain, assisted, 150, 5e-3)
    assert same >= 45


@pytest.mark.parametrize("attn", ["sdpa", "eager", "kvarn"])
def test_a_verification_forward_through_the_model_attends_like_decoding(attn):
    """A model driven by hand with bind(verify_from=150): one forward of 99 draft tokens (left-padded batch; a tile
    of each row completes inside it) gives the logits of one-token decoding, up to float rounding amplified by
    quantization codes (keys computed in a batch round differently); the same forward without verify_from is ~25x
    further off. Covers the mask that register.py hands to the sdpa and eager attention."""
    model = make_model("llama", attn)
    ids = tokens(249, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0

    def logits(cache, chunks):
        out, pos = [], 0
        for n in chunks:
            out.append(model(ids[:, pos : pos + n], attention_mask=mask[:, : pos + n], past_key_values=cache).logits)
            pos += n
        return torch.cat(out, 1)[:, 149:].where(mask[:, 149:, None].bool(), 0)

    want = logits(KVarNCache(PRESET), [150] + [1] * 99)
    errors = []
    for verify_from in (150, None):
        cache = KVarNCache(PRESET)
        cache.bind(model.config, mask, verify_from=verify_from)
        errors.append(float((logits(cache, [150, 99]) - want).abs().max()))
    assert errors[0] < 0.1 * errors[1], errors


@pytest.mark.slow
def test_smollm2_assisted_decoding_equals_plain_greedy():
    """SmolLM2-135M-Instruct on the fused path, kvarn_k4v2_g64, a 230-token Wikipedia prompt (two tiles quantized
    in it; the third completes at 256 tokens, during generation) and 40 new tokens, the model drafting for itself
    200 tokens at a time (capped at the 39 left): the greedy tokens are plain greedy decoding's and so are the logits,
    up to float rounding that a quantization code may amplify after the tile completed inside a verification forward
    (~1e-3; benchmarks/hf/assisted_agreement.py measures 20, 200 and 400-token drafts)."""
    from kvarn_eval.assets import fetch_text, load_model

    model, tokenizer = load_model("smollm2-135m", attn_implementation="kvarn")
    prompt = tokenizer(fetch_text("wiki"), return_tensors="pt").input_ids[:, :230]
    kwargs = dict(max_new_tokens=40, output_logits=True, return_dict_in_generate=True)
    plain = generate(model, prompt, KVarNCache("kvarn_k4v2_g64"), **kwargs)
    assisted = generate(model, prompt, KVarNCache("kvarn_k4v2_g64"), assistant_model=drafting(model, 200), **kwargs)
    assert torch.equal(assisted.sequences, plain.sequences)
    diffs = [float((a - b).abs().max()) for a, b in zip(assisted.logits, plain.logits, strict=True)]
    assert max(diffs[:27]) < 1e-4  # queries up to position 255: no tile completed inside a forward before them
    assert max(diffs) < 1e-2
