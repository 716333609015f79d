"""The real vLLM 0.22 engine with the plugin, on a CPU (vLLM's CPU build, `vllm-cpu`; the KVarN backend runs the
kernel core's plain-PyTorch path): a real model, real scheduler, real persistent batch. Runs in the venv that
`scripts/vllm_cpu_engine.sh` makes; skipped wherever vLLM cannot run a model on this machine (e.g. the main .venv,
whose vLLM is the CUDA build without a GPU).

The model is SmolLM2-135M (head_dim 64, 30 layers, 3 KV heads) exported to a bf16 folder (KVARN_ENGINE_MODEL, or
exported here from the GGUF the demo fetches); the preset kvarn_k4v2_g64, so prompts of 100–1200 tokens span the
sink, up to 17 quantized tiles and a partial tail.
"""

from __future__ import annotations

import gc
import os
import random

import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: 46K tokens of SmolLM2 at 16 bits
# collective_rpc(slot_state) sends a function to the worker, which vLLM's serializer allows only by pickle.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def _engine_runs_here() -> bool:
    try:
        import vllm._C  # noqa: F401  (the compiled ops: absent or unloadable where this build cannot run)
        from vllm.platforms import current_platform
    except Exception:
        return False
    return current_platform.is_cpu() and vllm.__version__.startswith("0.22.")


if not _engine_runs_here():
    pytest.skip("needs vLLM 0.22's CPU build (scripts/vllm_cpu_engine.sh makes that venv)", allow_module_level=True)

from vllm import LLM, SamplingParams  # noqa: E402

from kvarn_vllm.runtime import slot_state  # noqa: E402

PRESET = "kvarn_k4v2_g64"
TEXT = ("The history of the lighthouse begins with fires lit on hilltops to guide ships home. Later, towers of stone "
        "carried lamps of oil, and mirrors gathered their light into beams that reached far across the water. ")
PROMPTS = [TEXT * n + "\n\nWhat did the keepers do?" for n in (2, 5, 13, 30)]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    given = os.environ.get("KVARN_ENGINE_MODEL")
    if given:
        return given
    import torch

    from kvarn_eval.assets import export_hf

    return str(export_hf("smollm2-135m", tmp_path_factory.mktemp("smollm2"), torch.bfloat16))


def _llm(model: str, kv: str, **kw) -> LLM:
    args = dict(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=4096, seed=0, max_num_seqs=8,
                enable_prefix_caching=True)
    args.update(kw)
    if kv != "auto":
        args["kv_cache_dtype"] = kv
    return LLM(**args)


def _close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _greedy(llm: LLM, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, ignore_eos=True)
    return [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.fixture(scope="module")
def sixteen_bit(model_dir):
    llm = _llm(model_dir, "auto")
    try:
        yield _greedy(llm, PROMPTS)
    finally:
        _close(llm)


@pytest.fixture(scope="module")
def kvarn(model_dir, sixteen_bit):  # after the 16-bit engine is gone: one engine at a time
    llm = _llm(model_dir, PRESET)
    try:
        yield llm
    finally:
        _close(llm)


def _first_difference(base, other) -> int | None:
    """vLLM's check_logprobs_close rule (tests/models/quantization/test_fp8.py): None where the greedy tokens are
    equal; else the first differing position, where each run's token must be among the other's top 5."""
    a, b = list(base.token_ids), list(other.token_ids)
    assert len(a) == len(b)
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    if n is not None:
        assert a[n] in other.logprobs[n] and b[n] in base.logprobs[n], f"diverged at token {n} outside the top 5"
    return n


def test_greedy_outputs_are_logprob_close_to_16_bit(kvarn, sixteen_bit):
    outs = _greedy(kvarn, PROMPTS)
    diffs = [_first_difference(base, other) for base, other in zip(sixteen_bit, outs, strict=True)]
    identical = sum(d is None for d in diffs)
    assert identical >= len(PROMPTS) // 2, f"only {identical} of {len(PROMPTS)} outputs identical to 16-bit: {diffs}"


def test_a_prefix_cache_hit_gives_the_output_of_the_first_pass(kvarn):
    """The same prompts again after the first requests finished: their quantized tiles come from the prefix cache
    and their 16-bit sinks from the retained slots; the greedy tokens must not change."""
    first = [list(o.token_ids) for o in _greedy(kvarn, PROMPTS)]
    again = [list(o.token_ids) for o in _greedy(kvarn, PROMPTS)]
    assert again == first
    # A hit on a prefix shared by a new question (the first 13 paragraphs' tiles are cached).
    shared = [TEXT * 13 + "\n\nWhere were the towers?"]
    assert [list(o.token_ids) for o in _greedy(kvarn, shared)] == [list(o.token_ids) for o in _greedy(kvarn, shared)]


def test_aborts_mid_prefill_and_mid_decode_and_many_requests_leak_no_slot(kvarn):
    """120 requests through the engine's own loop, a third or more of them aborted at random steps (some before their
    prefill finished); afterwards no slot is held and every slot is free or retained for a prefix hit."""
    engine = kvarn.llm_engine
    rng = random.Random(0)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    pending = [f"r{i}" for i in range(120)]
    live: set[str] = set()
    aborted = finished = 0
    while pending or engine.has_unfinished_requests():
        while pending and len(live) < 12:
            rid = pending.pop()
            engine.add_request(rid, TEXT * rng.randint(1, 4) + f" Request {rid}.", sp)
            live.add(rid)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        if live and rng.random() < 0.5:
            rid = rng.choice(sorted(live))
            engine.abort_request([rid])
            live.discard(rid)
            aborted += 1
    assert aborted >= 20 and finished + aborted == 120
    # vLLM tells the workers about finished and aborted requests in its next step: run one more request, so that
    # only it (finished in the last step) can still hold a slot.
    engine.add_request("last", "One more request.", sp)
    while engine.has_unfinished_requests():
        engine.step()
    (state,) = kvarn.collective_rpc(slot_state)
    assert state["live"] <= 1
    assert state["free"] + state["retained"] + state["live"] == state["num_slots"] == 8


def test_forced_preemption_keeps_outputs_logprob_close(model_dir, kvarn):
    """So few pages that requests are preempted and recomputed. A recomputed request re-prefills its prompt and the
    tokens it had generated in one pass, whose queries attend the 16-bit keys of tiles that decode attended
    quantized (as with chunked prefill, docs/vllm.md), and every request's batches change, so greedy tokens may part
    where a logit margin is small: every output must stay logprob-close (vLLM's rule for runs batched differently)
    and no sink may be lost (a lost one is rebuilt from its quantized copy, with a warning)."""
    # Own first tiles (no prefix hits on the earlier tests' blocks, whose sinks may have been rebuilt).
    prompts = [f"Question {i} of a test on lighthouses. " + TEXT * 3 + "\n\nWhat did the keepers do?"
               for i in range(4)]
    expected = _greedy(kvarn, prompts, 180)
    # 14 pages of 64 tokens: the 4 prompts (~150 tokens, 3 pages each) are admitted together, then their decodes
    # need 5-6 pages each, so the scheduler preempts and recomputes.
    tight = _llm(model_dir, PRESET, num_gpu_blocks_override=14, max_model_len=896, max_num_seqs=4,
                 disable_log_stats=False)
    try:
        got = _greedy(tight, prompts, 180)
        preemptions = sum(m.value for m in tight.get_metrics() if m.name == "vllm:num_preemptions")
        (state,) = tight.collective_rpc(slot_state)
    finally:
        _close(tight)
    assert preemptions > 0 and state["sink_rebuilds"] == 0
    for e, g in zip(expected, got, strict=True):
        _first_difference(e, g)


def test_tensor_parallel_ranks_quantize_their_own_heads(model_dir, kvarn, monkeypatch):
    """Tensor parallelism 3 (SmolLM2's 3 KV heads: one per rank, each rank with its own pools and slots and no
    cross-rank state): greedy outputs logprob-close to the single-rank KVarN engine, at least half identical (the
    ranks' partial sums change the 16-bit activations slightly, as they do for the 16-bit cache)."""
    expected = _greedy(kvarn, PROMPTS)
    # vLLM's CPU build pins each rank's threads to a NUMA node unless told which cores to use.
    cores = os.cpu_count() or 1
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % cores) for i in range(3)))
    tp = _llm(model_dir, PRESET, tensor_parallel_size=3, distributed_executor_backend="mp")
    try:
        got = _greedy(tp, PROMPTS)
        states = tp.collective_rpc(slot_state)
    finally:
        _close(tp)
    assert len(states) == 3 and all(s["sink_rebuilds"] == 0 and s["live"] == 0 for s in states), states
    diffs = [_first_difference(e, g) for e, g in zip(expected, got, strict=True)]
    assert sum(d is None for d in diffs) >= len(PROMPTS) // 2, f"TP=3 against TP=1 first differences: {diffs}"
