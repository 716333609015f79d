"""`kvarn eval --engine vllm`: the same tasks and scoring through vLLM, one engine per KV-cache dtype (a GPU; vLLM's CPU
build runs it too, slowly: the KVarN backend then takes the kernels' PyTorch reference).

Each method is a vLLM ``kv_cache_dtype``: ``16-bit`` is ``auto``; ``fp8``, ``turboquant_4bit_nc`` and the KVarN
presets (``kvarn_k4v2_g128``, ...; registered by the kvarn_vllm plugin, which vLLM loads itself) pass through.
The model must be a Hugging Face folder (``kvarn assets export-hf NAME DIR``). Generation tasks send all prompts
to one engine (greedy, the task's stop strings); log-likelihood tasks ask for prompt log-probabilities with chunked
prefill forced to ``--chunk`` tokens per step, so later chunks read earlier ones from the quantized cache; the
prefix cache is off, so no choice reuses another's blocks.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VLLM_DTYPES", "kv_cache_dtype", "run_vllm_task"]

VLLM_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "turboquant_4bit_nc")
GENERATION_TASKS = ("gsm8k", "humaneval", "mbpp", "needle")
LOGLIK_TASKS = ("mmlu", "arc", "hellaswag")


def kv_cache_dtype(method: str) -> str:
    """vLLM's ``kv_cache_dtype`` for a method name of `kvarn eval --engine vllm`."""
    from kvarn_kernels import PRESETS

    if method == "16-bit":
        return "auto"
    if method in VLLM_DTYPES or method in PRESETS:
        return method
    raise ValueError(f"method {method!r} has no vLLM kv_cache_dtype; with --engine vllm use 16-bit, "
                     f"{', '.join(VLLM_DTYPES[1:])} or a KVarN preset ({', '.join(PRESETS)})")


def _engine(model_dir: str, dtype: str, chunk: int | None, max_len: int | None, **kw: Any) -> Any:
    from vllm import LLM

    args: dict[str, Any] = {"model": model_dir, "kv_cache_dtype": dtype, "enable_prefix_caching": False,
                            "gpu_memory_utilization": 0.85, "seed": 0, **kw}
    if chunk is not None:
        args.update(enable_chunked_prefill=True, max_num_batched_tokens=chunk)
    if max_len is not None:
        args["max_model_len"] = max_len
    return LLM(**args)


def _free(llm: Any) -> None:
    del llm
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  (freeing is best effort between engines)
        pass


def _generate(llm: Any, prompts: Sequence[Any], max_new: int, stops: Sequence[str]) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, stop=list(stops) or None)
    t0 = time.perf_counter()
    outs = llm.generate(list(prompts), params)
    seconds = time.perf_counter() - t0
    rows = []
    for out in outs:
        comp = out.outputs[0]
        rows.append({"completion": comp.text, "raw": comp.text, "new_tokens": len(comp.token_ids),
                     "prompt_tokens": len(out.prompt_token_ids), "batch_seconds": seconds})
    return rows


def _choice_scores(llm: Any, docs: Sequence[tuple[str, list[str], int]]) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after its context (prompt log-probs of context+choice)."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    prompts, spans = [], []
    for context, choices, _ in docs:
        ctx = tok(context).input_ids
        for c in choices:
            whole = tok(context + c).input_ids
            if whole[: len(ctx)] != ctx:
                whole = ctx + tok(c, add_special_tokens=False).input_ids
            prompts.append({"prompt_token_ids": whole})
            spans.append(len(ctx))
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    flat = []
    for out, start, prompt in zip(outs, spans, prompts, strict=True):
        ids = prompt["prompt_token_ids"]
        flat.append(sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))))
    scores, k = [], 0
    for _, choices, _ in docs:
        scores.append(flat[k : k + len(choices)])
        k += len(choices)
    return scores


def run_vllm_task(task: str, model_dir: str, methods: Sequence[str], limit: int | None,
                  chunk: int = 64, **options: Any) -> dict[str, Any]:
    """Run ``task`` for each method with its own vLLM engine; same prompts and scoring as the transformers path."""
    from . import evaluate
    from .assets import load_split
    from .tasks import scoring

    if not Path(model_dir).is_dir():
        raise ValueError(f"--engine vllm needs a Hugging Face folder as --model (kvarn assets export-hf NAME DIR); "
                         f"got {model_dir!r}")
    dtypes = {m: kv_cache_dtype(m) for m in methods}
    summary: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    if task in GENERATION_TASKS:
        setup_options = {**options, "model_dir": model_dir}
        prompts, stops, max_new, score = _generation_setup(task, limit, setup_options, load_split, scoring, evaluate)
        for m in methods:
            llm = _engine(model_dir, dtypes[m], options.get("prefill_chunk"), None)
            rows = _generate(llm, prompts, max_new, stops)
            _free(llm)
            for i, r in enumerate(rows):
                r["completion"] = scoring.truncate_at_stops(r["raw"], stops)
                r.update(score(i, r["completion"]))
            samples[m] = rows
        ref = samples[methods[0]]
        for m in methods:
            rows = samples[m]
            summary[m] = {"score": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
                          "same_completion_as_16bit": evaluate.same_completions(rows, ref),
                          "mean_new_tokens": sum(r["new_tokens"] for r in rows) / len(rows),
                          "kv_cache_dtype": dtypes[m]}
    elif task in LOGLIK_TASKS:
        build, default_shots = evaluate.LOGLIK_DOCS[task]
        docs = build(limit, options.get("shots") or default_shots)
        for m in methods:
            llm = _engine(model_dir, dtypes[m], chunk, None)
            scores = _choice_scores(llm, docs)
            _free(llm)
            samples[m] = [{"index": i, "scores": s, "gold": d[2], "pred": scoring.pick_choice(s)}
                          for i, (s, d) in enumerate(zip(scores, docs, strict=True))]
        ref = samples[methods[0]]
        for m in methods:
            rows = samples[m]
            summary[m] = {"score": sum(r["pred"] == r["gold"] for r in rows) / len(rows), "n": len(rows),
                          "same_choice_as_16bit": sum(a["pred"] == b["pred"] for a, b in zip(rows, ref, strict=True))
                          / len(rows), "kv_cache_dtype": dtypes[m]}
    else:
        raise ValueError(f"task {task!r} has no vLLM path; use one of {', '.join(GENERATION_TASKS + LOGLIK_TASKS)}")
    setup = {"engine": "vllm", "chunk": chunk if task in LOGLIK_TASKS else options.get("prefill_chunk"),
             "feeding": "vLLM chunked prefill" if task in LOGLIK_TASKS else "vLLM scheduler defaults"}
    if task == "humaneval":
        setup["chat_template"] = setup_options["chat_template_used"]
    return {"summary": summary, "samples": samples, "setup": setup}


def _generation_setup(task: str, limit: int | None, options: dict[str, Any], load_split: Any, scoring: Any,
                      evaluate: Any) -> tuple[list[Any], Sequence[str], int, Any]:
    """Prompts (text, or token ids), stops, token cap and scorer of a generation task; for humaneval it records in
    `options` whether the chat template was used."""
    if task == "gsm8k":
        shots = load_split("gsm8k", "fewshot")
        docs = evaluate._limit(load_split("gsm8k", "test"), limit)
        return ([scoring.gsm8k_prompt(d["question"], shots) for d in docs], scoring.GSM8K_STOPS,
                options.get("max_new", 256),
                lambda i, c: {"correct": scoring.gsm8k_correct(c, docs[i]["answer"])})
    if task in ("humaneval", "mbpp"):
        from .sandbox import run_python

        docs = evaluate._limit(load_split(task, "test"), limit)
        if task == "humaneval":
            def program(i: int, c: str) -> str:
                d = docs[i]
                return scoring.humaneval_program(d["prompt"], c, d["test"], d["entry_point"])
            stops = scoring.HUMANEVAL_STOPS
        else:
            def program(i: int, c: str) -> str:
                return scoring.mbpp_program(c, docs[i]["test_list"], docs[i]["test_setup_code"])
            stops = scoring.MBPP_STOPS

        def score(i: int, c: str) -> dict[str, Any]:
            res = run_python(program(i, c), timeout_s=10.0, memory_mb=1024)
            return {"correct": res.passed, "status": res.status}

        prompts: list[Any] = [d["prompt"] for d in docs]
        if task == "humaneval":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(options["model_dir"])
            prompts, chat = evaluate.humaneval_prompts(tokenizer, prompts, options.get("chat_template"))
            options["chat_template_used"] = chat
            if chat:  # the template carries the special tokens: vLLM must not add a second BOS
                prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
                stops = scoring.HUMANEVAL_CHAT_STOPS
        return prompts, stops, options.get("max_new", 384), score
    from transformers import AutoTokenizer

    from .assets import fetch_text
    from .tasks.needle import make_needle_items, needle_correct

    tokenizer = AutoTokenizer.from_pretrained(options["model_dir"])
    lengths, depths = options.get("lengths", (4096,)), options.get("depths", (0.1, 0.3, 0.5, 0.7, 0.9))
    items = [it for n in lengths for it in make_needle_items(tokenizer, fetch_text("pg-essays"), n, tuple(depths))]
    items = evaluate._limit(items, limit)
    return ([it.prompt for it in items], ("\n",), 12,
            lambda i, c: {"correct": needle_correct(c, items[i].answer), "length": items[i].context_tokens})
