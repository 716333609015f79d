"""KVarNCache on CUDA: the fused path runs the Triton kernels (quantize + paged attention) inside real models."""

from __future__ import annotations

import pytest
import torch
from hf_models import CHUNKS_QUANT, GROUP, PRESET, make_model, max_diff, run, tokens

from kvarn_eval.hf_eval import SimulatedTileCache, kvarn_codec
from kvarn_hf import KVarNCache

pytestmark = pytest.mark.gpu


def on_cuda(model):
    return model.to("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
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
