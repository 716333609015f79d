"""kvarn_eval.evaluate and .methods on a tiny random Llama: the engine's numbers against plain transformers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tiny_lm import save_tiny_model
from transformers import DynamicCache, LlamaForCausalLM

from kvarn_eval import evaluate
from kvarn_eval.evaluate import LoadedModel, choice_logprobs, feed, greedy
from kvarn_eval.methods import METHOD_GROUPS, get_method, resolve_methods
from kvarn_kernels import PRESETS, KVarNFormat


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LoadedModel("tiny", model, AutoTokenizer.from_pretrained(folder), "cpu", torch.float32, str(folder))


def test_bytes_per_token_of_each_family():
    d = 128
    assert get_method("16-bit").bytes_per_token(d) == 512
    for preset in PRESETS:
        want = KVarNFormat.from_preset(preset, d, torch.float16).bytes_per_token_per_head
        assert get_method(preset).bytes_per_token(d) == want
        assert get_method(f"sim:{preset}").bytes_per_token(d) == want
        assert get_method(f"{preset}-norot").bytes_per_token(d) == want
    assert get_method("kivi-k4v2").bytes_per_token(d) == 64 + 4 + 32 + 4  # codes + per-channel / per-token scales
    assert get_method("quanto-2bit").bytes_per_token(d) == 2 * (32 + 8)  # 2-bit codes + 16-bit scale/zero per 64
    assert get_method("hf-fp8").bytes_per_token(d) == 256


def test_resolve_methods_puts_16bit_first_expands_groups_and_checks_names():
    names = [m.name for m in resolve_methods(["ablations", "sim:kvarn_k4v2_g128", "kivi-k4v2"])]
    assert names == ["16-bit", *METHOD_GROUPS["ablations"], "sim:kvarn_k4v2_g128"]
    with pytest.raises(ValueError, match="method 'kvarn_k3v3' is unknown"):
        resolve_methods(["kvarn_k3v3"])


@torch.no_grad()
def test_greedy_matches_generate(lm: LoadedModel):
    prompt = lm.tokenizer("def add(a, b):\n").input_ids
    ours = greedy(lm, prompt, DynamicCache(), 12, stops=())
    ids = torch.tensor([prompt])
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None)[0, len(prompt):].tolist()
    n = ours["new_tokens"]
    assert 1 <= n <= 12
    assert ours["raw"] == lm.tokenizer.decode(ref[:n], skip_special_tokens=True)


@torch.no_grad()
def test_greedy_stops_at_stop_string(lm: LoadedModel):
    prompt = lm.tokenizer("Question: Tom has").input_ids
    full = greedy(lm, prompt, DynamicCache(), 20, stops=())
    assert full["raw"]
    stop = full["raw"][len(full["raw"]) // 2:][:2] or full["raw"][:1]
    cut = greedy(lm, prompt, DynamicCache(), 20, stops=(stop,))
    assert stop in cut["raw"] and stop not in cut["completion"]
    assert cut["completion"] == full["raw"][: full["raw"].index(stop)]


@torch.no_grad()
def test_chunked_feed_equals_one_forward(lm: LoadedModel):
    ids = list(range(5, 305))
    one = lm.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(feed(lm, ids, DynamicCache(), 64), one, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_choice_logprobs_with_16bit_equal_a_plain_forward(lm: LoadedModel):
    context = "The following are multiple choice questions (with answers) about anatomy.\n" * 20
    choices = [" A", " B. two", " C"]
    scores, n_ctx = choice_logprobs(lm, context, choices, DynamicCache, chunk=32)
    ctx = lm.tokenizer(context).input_ids
    assert n_ctx == len(ctx) > 256
    for choice, score in zip(choices, scores, strict=True):
        whole = lm.tokenizer(context + choice).input_ids
        logp = lm.model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        want = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        assert score == pytest.approx(want, abs=1e-4)


def test_perplexity_lockstep_reference_and_identity(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("kvarn_eval.assets.fetch_text", lambda name: " ".join(["def add(a, b): return a + b"] * 200))
    methods = resolve_methods(["sim:kvarn_k4v2_g128", "kivi-k2v2"])
    out = evaluate.run_task("perplexity", lm, methods, limit=None, tokens=400, chunk=50)
    ref, sim, kivi = (out["summary"][m.name] for m in methods)
    assert ref["kl"] == 0 and ref["top1_agreement"] == 1 and ref["ppl_delta_pct"] == 0
    assert sim["n"] == 400 and 0 < sim["kl"] and 0 < kivi["kl"]
    assert ref["kv_bytes_per_token"] == 2 * 1 * 4 * 64  # 2 layers x 1 KV head x 256 bytes
    assert sim["bits_per_element"] == pytest.approx(8 * get_method("sim:kvarn_k4v2_g128").bytes_per_token(64) / 128)


def test_run_task_rejects_bad_arguments(lm: LoadedModel):
    with pytest.raises(ValueError, match="task 'squad' is unknown"):
        evaluate.run_task("squad", lm, resolve_methods([]))
    with pytest.raises(ValueError, match="--limit must be positive, got 0"):
        evaluate.run_task("perplexity", lm, resolve_methods([]), limit=0)


def test_humaneval_end_to_end_and_written_results(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    docs = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": "add", "canonical_solution": "    return a + b\n"}] * 2
    monkeypatch.setattr("kvarn_eval.assets.load_split", lambda name, split: docs)
    # a stand-in generator that writes the right body for item 0 and a wrong one for item 1
    bodies = iter(["    return a + b\n", "    return a - b\n"] * 2)
    monkeypatch.setattr(evaluate, "greedy", lambda *a, **k: {"completion": next(bodies), "raw": "x", "new_tokens": 5,
                                                            "prefill_s": 0.1, "decode_s": 0.5})
    methods = resolve_methods(["sim:kvarn_k4v2_g128"])
    result = evaluate.run_task("humaneval", lm, methods, limit=2)
    s = result["summary"]["sim:kvarn_k4v2_g128"]
    assert s["score"] == 0.5 and s["n"] == 2 and s["decode_tokens_per_s"] == pytest.approx(10.0)
    assert [r["status"] for r in result["samples"]["16-bit"]] == ["passed", "failed"]
    jpath, cpath = evaluate.write_results(result, tmp_path, "kvarn eval humaneval --limit 2", tag="t")
    assert jpath == tmp_path / "tiny" / "humaneval-t.json"
    data = json.loads(jpath.read_text())
    assert data["command"] == "kvarn eval humaneval --limit 2" and data["limit"] == 2
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["device"] == "cpu"
    rows = list(csv.reader(cpath.open()))
    assert rows[0][:3] == ["method", "score", "n"] and rows[1][:3] == ["16-bit", "0.5", "2"]
    assert rows[-1] == ["# command: kvarn eval humaneval --limit 2"]


CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_humaneval_prompts_use_the_chat_template_when_there_is_one(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    prompt = 'def add(a, b):\n    """Add."""\n'
    assert evaluate.humaneval_prompts(lm.tokenizer, [prompt]) == ([prompt], False)  # no template: plain
    with pytest.raises(ValueError, match="has no chat template"):
        evaluate.humaneval_prompts(lm.tokenizer, [prompt], chat_template=True)
    monkeypatch.setattr(lm.tokenizer, "chat_template", CHAT)
    (chat,), used = evaluate.humaneval_prompts(lm.tokenizer, [prompt])
    assert used and chat == ("<s>user\nComplete the following Python function.\n\n```python\n"
                             'def add(a, b):\n    """Add."""\n```</s>\n<s>assistant\n```python\n')
    assert evaluate.humaneval_prompts(lm.tokenizer, [prompt], chat_template=False) == ([prompt], False)


def test_humaneval_with_the_chat_template_end_to_end(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    """The templated prompt reaches the model without a second BOS; the whole function the model writes is scored
    appended to the prompt (it replaces the docstring-only definition), generation stops only at the closing fence;
    the results record the choice; --chat-template maps to the option."""
    prompt = 'def add(a, b):\n    """Add."""\n'  # as in HumanEval: a docstring-only function
    docs = [{"task_id": "HumanEval/0", "prompt": prompt, "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": "add"}]
    monkeypatch.setattr("kvarn_eval.assets.load_split", lambda name, split: docs)
    monkeypatch.setattr(lm.tokenizer, "chat_template", CHAT)
    seen = []

    def fake_greedy(lm_, ids, cache, max_new, stops, *args, **kwargs):
        seen.append(list(ids))
        chat = stops == ("```",)
        code = "import math\n\ndef add(a, b):\n    return a + b\n" if chat else "    return a + b\n"
        return {"completion": code, "raw": "", "new_tokens": 4, "prefill_s": 0.1, "decode_s": 0.4}

    monkeypatch.setattr(evaluate, "greedy", fake_greedy)
    from tokenizers.processors import TemplateProcessing

    bos = lm.tokenizer.bos_token_id  # a tokenizer that adds BOS itself, as Gemma's does
    monkeypatch.setattr(lm.tokenizer._tokenizer, "post_processor",
                        TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)]))
    methods = resolve_methods([])
    result = evaluate.run_task("humaneval", lm, methods, limit=1)
    assert result["setup"]["chat_template"] is True and result["summary"]["16-bit"]["score"] == 1.0
    assert seen[0][:2] == [bos, lm.tokenizer("user").input_ids[1]]  # the template's BOS only
    assert lm.tokenizer.decode(seen[0]).endswith("<s>assistant\n```python\n")
    off = evaluate.run_task("humaneval", lm, methods, limit=1, chat_template=False)
    assert off["setup"]["chat_template"] is False and seen[-1] == lm.tokenizer(prompt).input_ids
    assert off["summary"]["16-bit"]["score"] == 1.0  # the plain path got a body and the default stops
    import argparse

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    for flag, value in (("auto", None), ("on", True), ("off", False)):
        args = parser.parse_args(["humaneval", "--chat-template", flag])
        assert evaluate.options_from(args) == {"chat_template": value}
    assert evaluate.options_from(parser.parse_args(["humaneval"])) == {"chat_template": None}


def test_refresh_agreement_recomputes_the_stale_column_only(tmp_path: Path):
    """A result stored when 'same output' compared raw text (stop string included) gets the cut-completion figure;
    the rest of the file, the command included, stays as it was."""
    rows16 = [{"completion": "A. So the answer is 1.", "raw": "A. So the answer is 1."},
              {"completion": "B", "raw": "B\n\n"}]
    rows_q = [{"completion": "A. So the answer is 1.", "raw": "A. So the answer is 1.\n\n"},
              {"completion": "C", "raw": "C\n\n"}]
    summary = {name: {"score": 0.0, "n": 2, "same_completion_as_16bit": value, "mean_new_tokens": 7.0}
               for name, value in (("16-bit", 1.0), ("sim:kvarn_k4v2_g128", 0.0))}
    result = {"task": "gsm8k", "model": "tiny", "model_source": "x" * 20, "limit": 2, "summary": summary,
              "samples": {"16-bit": rows16, "sim:kvarn_k4v2_g128": rows_q},
              "environment": {"device_name": "cpu", "torch": "t", "transformers": "t"}}
    jpath, cpath = evaluate.write_results(result, tmp_path, "kvarn eval gsm8k --limit 2")
    evaluate.refresh_agreement(jpath)
    data = json.loads(jpath.read_text())
    assert data["summary"]["sim:kvarn_k4v2_g128"]["same_completion_as_16bit"] == 0.5
    assert data["summary"]["16-bit"]["same_completion_as_16bit"] == 1.0
    assert data["refreshed"][0]["before"]["sim:kvarn_k4v2_g128"] == 0.0
    assert data["command"] == "kvarn eval gsm8k --limit 2" and data["samples"]["sim:kvarn_k4v2_g128"] == rows_q
    rows = list(csv.reader(cpath.open()))
    assert rows[2][:4] == ["sim:kvarn_k4v2_g128", "0.0", "2", "0.5"]
