"""KVarNCache on CUDA: the fused path runs the Triton kernels (quantize + paged attention) inside real models."""

from __future__ import annotations

import pytest
import torch
from hf_models import CHUNKS_QUANT, GROUP, PRESET, make_model, max_diff, run, tokens

from kvarn_eval.hf_eval import SimulatedTileCache, kvarn_codec
from kvarn_hf import KVarNCache, graphs

pytestmark = pytest.mark.gpu


def on_cuda(model):
    return model.to("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])  # head_dim 64, 128, 96, 256
def test_fused_triton_path_matches_the_reference(arch, dtype):
    """Logits of the fused CUDA path versus the reference tile simulation on the dense path (same device)."""
    fused, dense = on_cuda(make_model(arch, "kvarn", dtype)), on_cuda(make_model(arch, "sdpa", dtype))
    want = run(dense, SimulatedTileCache(kvarn_codec(PRESET), GROUP, dense.config), CHUNKS_QUANT, device="cuda")
    got = run(fused, KVarNCache(PRESET, config=fused.config), CHUNKS_QUANT, device="cuda")
    assert all(torch.isfinite(x).all() for x in got)
    scale = max(float(x.abs().max()) for x in want)
    assert max_diff(got, want) < 0.05 * scale


def test_generate_on_cuda_with_padding_and_beams():
    model = on_cuda(make_model("llama", "kvarn", torch.bfloat16))
    prompts = [tokens(150, seed=1), tokens(85, seed=2)]
    ids = torch.cat([torch.nn.functional.pad(p, (150 - p.shape[1], 0)) for p in prompts]).cuda()
    mask = (ids != 0).long()
    cache = KVarNCache(PRESET)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 210) and cache.fused and cache.layers[0].tiles.is_cuda
    alone = model.generate(prompts[1].cuda(), max_new_tokens=60, do_sample=False, past_key_values=KVarNCache(PRESET))
    assert torch.equal(out[1, 150:160], alone[0, 85:95])  # bf16 Triton numerics: compare the first tokens
    beams = model.generate(prompts[0].cuda(), max_new_tokens=20, num_beams=3, do_sample=False,
                           past_key_values=KVarNCache(PRESET))
    assert beams.shape == (1, 170)


def test_decode_from_cuda_graphs(monkeypatch):
    """generate() on CUDA decodes from captured graphs by default (decode_graphs=None). Replays equal the same
    static steps run eagerly (KVARN_NO_CAPTURE=1), bit for bit, across history buckets (one per tile here), tile
    completions (eager steps between replays) and a reallocation of the tile storage (graphs recaptured); and they
    agree with the plain fused path, whose split grid follows the history instead of a bucket."""
    monkeypatch.setattr(graphs, "MIN_BUCKET_TILES", 1)
    model = on_cuda(make_model("llama", "kvarn", torch.bfloat16))
    prompts = [tokens(150, seed=1), tokens(85, seed=2)]
    ids = torch.cat([torch.nn.functional.pad(p, (150 - p.shape[1], 0)) for p in prompts]).cuda()
    mask = (ids != 0).long()

    def two_calls(cache):
        first = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=200, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        cache.reserve(2048)  # reallocates tiles and block table: the captured graphs are stale
        more = torch.cat([first.sequences, tokens(1, batch=2, seed=3).cuda()], dim=1)
        second = model.generate(more, attention_mask=torch.cat([mask, torch.ones_like(more[:, 150:])], dim=1),
                                past_key_values=cache, max_new_tokens=40, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        return [*first.logits, *second.logits], second.sequences

    cache = KVarNCache(PRESET)
    graphed, seq = two_calls(cache)
    stats = cache._decoder.stats
    assert stats["captures"] >= 5 and stats["replays"] >= 180, stats
    monkeypatch.setenv("KVARN_NO_CAPTURE", "1")  # read per step, not at import
    static, static_seq = two_calls(KVarNCache(PRESET))
    assert torch.equal(seq, static_seq)
    assert all(torch.equal(a, b) for a, b in zip(graphed, static, strict=True))
    eager, eager_seq = two_calls(KVarNCache(PRESET, decode_graphs=False))
    assert torch.equal(seq[:, :170], eager_seq[:, :170])  # bf16, another split grid: compare the first tokens
    scale = max(float(x.abs().max()) for x in eager[:20])
    assert max(float((a - b).abs().max()) for a, b in zip(graphed[:20], eager[:20], strict=True)) < 0.02 * scale


def test_assisted_decoding_on_cuda_with_long_drafts():
    """Assisted generate() on the Triton path with 200-token drafts: the verification forwards run in parts and crops
    reopen tiles completed inside them (a random assistant: most drafts rejected); with the model drafting for
    itself most drafts are accepted. bf16 numerics: the first tokens agree with plain greedy decoding."""
    model = on_cuda(make_model("llama", "kvarn", torch.bfloat16))
    weak = on_cuda(make_model("llama", "kvarn", torch.bfloat16, seed=5))
    prompt = tokens(126).cuda()
    plain = model.generate(prompt, max_new_tokens=100, do_sample=False, past_key_values=KVarNCache(PRESET))
    for assistant in (weak, model):
        assistant.generation_config.update(num_assistant_tokens=200, num_assistant_tokens_schedule="constant",
                                           assistant_confidence_threshold=0.0)
        out = model.generate(prompt, max_new_tokens=100, do_sample=False, past_key_values=KVarNCache(PRESET),
                             assistant_model=assistant)
        assert out.shape == plain.shape
        assert torch.equal(out[:, 126:136], plain[:, 126:136])
