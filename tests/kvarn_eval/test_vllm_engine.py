"""kvarn_eval.vllm_engine against a stand-in `vllm` module: what each engine is asked for, and the scoring."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from kvarn_eval import vllm_engine


class FakeOut:
    def __init__(self, text: str, prompt_ids: list[int], prompt_logprobs: list | None = None) -> None:
        self.outputs = [types.SimpleNamespace(text=text, token_ids=[1] * 3)]
        self.prompt_token_ids = prompt_ids
        self.prompt_logprobs = prompt_logprobs


class FakeTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> types.SimpleNamespace:
        return types.SimpleNamespace(input_ids=[ord(c) for c in text])


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    engines: list[dict] = []

    class LLM:
        def __init__(self, **kwargs: object) -> None:
            engines.append(kwargs)

        def get_tokenizer(self) -> FakeTokenizer:
            return FakeTokenizer()

        def generate(self, prompts: list, params: object) -> list[FakeOut]:
            if getattr(params, "prompt_logprobs", None) is not None:  # log-likelihood: the last char "B" is likely
                outs = []
                for p in prompts:
                    ids = p["prompt_token_ids"]
                    lp = [None] + [{t: types.SimpleNamespace(logprob=-0.1 if t == ord("B") else -2.0)} for t in ids[1:]]
                    outs.append(FakeOut("", ids, lp))
                return outs
            right = engines[-1]["kv_cache_dtype"] == "auto"  # the 16-bit engine answers right, the others wrong
            return [FakeOut(" 3 + 4 = 7. So the answer is 7." if right else " So the answer is 8.", [0] * 5)
                    for _ in prompts]

    class SamplingParams:
        def __init__(self, **kwargs: object) -> None:
            self.__dict__.update(kwargs)

    module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, __version__="0.0-test")
    monkeypatch.setitem(sys.modules, "vllm", module)
    return engines


def test_kv_cache_dtype_names():
    assert vllm_engine.kv_cache_dtype("16-bit") == "auto"
    assert vllm_engine.kv_cache_dtype("fp8") == "fp8"
    assert vllm_engine.kv_cache_dtype("turboquant_4bit_nc") == "turboquant_4bit_nc"
    assert vllm_engine.kv_cache_dtype("kvarn_k4v2_g128") == "kvarn_k4v2_g128"
    with pytest.raises(ValueError, match="method 'sim:kvarn_k4v2_g128' has no vLLM kv_cache_dtype"):
        vllm_engine.kv_cache_dtype("sim:kvarn_k4v2_g128")


def test_gsm8k_one_engine_per_dtype(fake_vllm: list[dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    docs = [{"question": "Tom has 3 and gets 4. How many?", "answer": "7"}] * 3
    monkeypatch.setattr("kvarn_eval.assets.load_split",
                        lambda name, split: [{"question": "1+1?", "answer": "So the answer is 2."}] * 8
                        if split == "fewshot" else docs)
    out = vllm_engine.run_vllm_task("gsm8k", str(tmp_path), ["16-bit", "kvarn_k4v2_g128", "fp8"], limit=3)
    assert [e["kv_cache_dtype"] for e in fake_vllm] == ["auto", "kvarn_k4v2_g128", "fp8"]
    assert all(e["model"] == str(tmp_path) and e["enable_prefix_caching"] is False for e in fake_vllm)
    assert out["summary"]["16-bit"]["score"] == 1.0 and out["summary"]["fp8"]["score"] == 0.0
    assert out["summary"]["kvarn_k4v2_g128"]["same_completion_as_16bit"] == 0.0


def test_loglik_forces_chunked_prefill_and_scores_choices(fake_vllm: list[dict], monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path):
    from kvarn_eval import evaluate

    docs = [("Question: pick B\nAnswer:", [" A", " B", " C"], 1), ("Q2\nAnswer:", [" B", " A"], 0)]
    monkeypatch.setitem(evaluate.LOGLIK_DOCS, "arc", (lambda limit, shots: docs, 0))
    out = vllm_engine.run_vllm_task("arc", str(tmp_path), ["16-bit", "kvarn_k4v2_g128"], limit=None, chunk=32)
    assert [(e["enable_chunked_prefill"], e["max_num_batched_tokens"]) for e in fake_vllm] == [(True, 32)] * 2
    assert out["summary"]["16-bit"]["score"] == 1.0 and out["summary"]["kvarn_k4v2_g128"]["same_choice_as_16bit"] == 1
    assert [r["pred"] for r in out["samples"]["16-bit"]] == [1, 0]


def test_needs_a_folder_and_a_known_task(fake_vllm: list[dict], tmp_path: Path):
    with pytest.raises(ValueError, match="needs a Hugging Face folder"):
        vllm_engine.run_vllm_task("gsm8k", str(tmp_path / "missing"), ["16-bit"], limit=1)
    with pytest.raises(ValueError, match="task 'perplexity' has no vLLM path"):
        vllm_engine.run_vllm_task("perplexity", str(tmp_path), ["16-bit"], limit=1)
    assert fake_vllm == []


def test_humaneval_prompts_in_the_chat_template_as_token_ids(fake_vllm: list[dict], monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path):
    """With a chat template, the engine gets token ids encoded without added special tokens (the template has
    them); without one, the plain prompt text. The results record which."""
    docs = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "test": "def check(g):\n    pass\n", "entry_point": "f"}]
    monkeypatch.setattr("kvarn_eval.assets.load_split", lambda name, split: docs)
    seen: list[list] = []

    class ChatTokenizer(FakeTokenizer):
        chat_template = "{{ messages[0]['content'] }}"

        def __call__(self, text: str, add_special_tokens: bool = True) -> types.SimpleNamespace:
            return types.SimpleNamespace(input_ids=[1] * add_special_tokens + [ord(c) for c in text])

        def apply_chat_template(self, messages: list, tokenize: bool, add_generation_prompt: bool) -> str:
            return "<user>" + messages[0]["content"] + "<assistant>"

    for tokenizer, want_chat in ((ChatTokenizer(), True), (FakeTokenizer(), False)):
        monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda folder, t=tokenizer: t)
        llm_cls = sys.modules["vllm"].LLM
        monkeypatch.setattr(llm_cls, "generate", lambda self, prompts, params: seen.append(prompts) or
                            [FakeOut("    return 1\n", [0] * 3) for _ in prompts])
        out = vllm_engine.run_vllm_task("humaneval", str(tmp_path), ["16-bit"], limit=1)
        assert out["setup"]["chat_template"] is want_chat
    chat_prompt, plain_prompt = seen[0][0], seen[1][0]
    text = "<user>Complete the following Python function.\n\n```python\ndef f():\n```<assistant>```python\n"
    assert chat_prompt == {"prompt_token_ids": [ord(c) for c in text]}
    assert plain_prompt == "def f():\n"
