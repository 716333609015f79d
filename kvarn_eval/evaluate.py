"""`kvarn eval TASK`: one model, several KV-cache methods, the same prompts, one run; results as JSON and CSV.

Tasks and what reaches the quantized cache (KVarN keeps the first tile of tokens and the newest partial tile in
16-bit, so only tokens after ``sink + group`` = 256 with the g128 presets read quantized tiles):

- ``gsm8k``: 8-shot chain-of-thought, greedy, exact match of the final number. The prompt is prefilled in one
  forward (as a server does), so the prompt never reads quantized tiles; every generated token reads the quantized
  prompt, and errors accumulate over the generated reasoning.
- ``humaneval``, ``mbpp``: greedy completion, pass@1, the program run in :mod:`kvarn_eval.sandbox`. Their prompts are
  short (HumanEval ~150 tokens): only generated tokens past position 256 read quantized tiles, which the results
  report as ``quantized_share`` (share of generated tokens that read at least one quantized tile). HumanEval goes
  through the model's chat template when its tokenizer has one (``--chat-template auto``, the default; see
  `humaneval_prompts`), recorded as ``setup.chat_template`` in the results.
- ``needle``: RULER-style single needle in essay text at 4K/8K/16K/32K tokens and several depths; greedy answer.
- ``mmlu``, ``arc``, ``hellaswag``: log-likelihood of each choice. A single prefill forward never reads the cache,
  so the context (few-shot examples + question) is fed through the cache in chunks of ``--chunk`` tokens, and each
  choice is scored against that cache; the output says so and reports the share of context tokens that were
  quantized when the choices were scored.
- ``perplexity``: a text fed through each cache in chunks; perplexity, and next-token agreement with the 16-bit
  cache: KL(16-bit || method) of the next-token distributions and top-1 agreement.

Usage: ``kvarn eval gsm8k --model smollm2-135m --methods 16-bit sim:kvarn_k4v2_g128 kivi-k4v2 --limit 20``.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .methods import Method, resolve_methods
from .tasks import scoring
from .tasks.needle import make_needle_items, needle_correct

__all__ = ["TASKS", "LoadedModel", "load", "main", "run_task", "write_results"]

RESULTS_DIR = Path("results/eval")


# --------------------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    source: str  # the GGUF's sha256, or the folder it was loaded from

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    def kv_slots(self) -> int:
        """Layers x KV heads whose cache a method compresses (all layers; sliding layers are counted too)."""
        cfg = self.text_config
        return cfg.num_hidden_layers * cfg.num_key_value_heads

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def max_context(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 0) or 0)


def load(name: str, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model from the asset registry (``smollm2-135m``, ...) or a Hugging Face folder, with the "kvarn"
    attention registered (other caches fall back to the default attention)."""
    import kvarn_hf  # noqa: F401  (registers attn_implementation="kvarn")

    from .assets import MODELS, load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if name in MODELS:
        model, tok = load_model(name, dtype=dtype, device=device, attn_implementation="kvarn")
        source = MODELS[name].sha256
    elif Path(name).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="kvarn").to(device).eval()
        source = str(Path(name).resolve())
    else:
        raise ValueError(f"model {name!r} is neither a known asset ({', '.join(MODELS)}) nor a directory")
    return LoadedModel(name, model, tok, device, dtype, source)


# --------------------------------------------------------------------------------------------- engine


def _ids(lm: LoadedModel, text: str, special: bool = True) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=special).input_ids


@torch.no_grad()
def _forward(lm: LoadedModel, ids: Sequence[int], cache: Any) -> torch.Tensor:
    x = torch.tensor([list(ids)], device=lm.device)
    return lm.model(x, past_key_values=cache, use_cache=True).logits[0]


@torch.no_grad()
def feed(lm: LoadedModel, ids: Sequence[int], cache: Any, chunk: int | None) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` (``chunk`` tokens per forward; None = one forward); last position's logits."""
    step = chunk or max(len(ids), 1)
    logits = None
    for start in range(0, len(ids), step):
        logits = _forward(lm, ids[start : start + step], cache)
    assert logits is not None, "feed() needs at least one token"
    return logits[-1]


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy(lm: LoadedModel, prompt: Sequence[int], cache: Any, max_new: int, stops: Sequence[str],
           prefill_chunk: int | None = None) -> dict[str, Any]:
    """Greedy decoding until an end-of-sequence token, a stop string or ``max_new`` tokens.

    Returns the completion cut at the first stop string, the number of generated tokens and the times.
    """
    eos = _eos_ids(lm)
    t0 = time.perf_counter()
    logits = feed(lm, prompt, cache, prefill_chunk)
    t1 = time.perf_counter()
    out: list[int] = []
    text = ""
    while len(out) < max_new:
        tok = int(logits.argmax())
        if tok in eos:
            break
        out.append(tok)
        text = lm.tokenizer.decode(out, skip_special_tokens=True)
        if any(s in text for s in stops):
            break
        logits = _forward(lm, [tok], cache)[-1]
    t2 = time.perf_counter()
    return {"completion": scoring.truncate_at_stops(text, stops), "raw": text, "new_tokens": len(out),
            "prefill_s": t1 - t0, "decode_s": t2 - t1}


def quantized_after(group: int = 128, sink: int = 128) -> int:
    """Position from which a token reads at least one quantized tile (KVarN g128: 256)."""
    return sink + group


def _method_group(method: Method) -> int:
    from kvarn_kernels import PRESETS

    base = method.name.removeprefix("sim:").removesuffix("-norot").removesuffix("-nonorm")
    return PRESETS[base][2] if base in PRESETS else 128


def _quantized_share(method: Method, prompt_len: int, new_tokens: int) -> float:
    """Share of generated tokens that read at least one quantized tile (0 for 16-bit)."""
    if method.family == "16-bit" or new_tokens == 0:
        return 0.0
    if method.family in ("quanto", "fp8"):  # quanto quantizes everything before its 128-token window; fp8 all
        start = 128 if method.family == "quanto" else 0
    else:
        g = _method_group(method)
        start = quantized_after(g, g)
    positions = range(prompt_len, prompt_len + new_tokens)
    return sum(p >= start for p in positions) / new_tokens


# --------------------------------------------------------------------------------------------- tasks


@dataclass
class TaskSpec:
    name: str
    metric: str  # the headline metric, a key of each method's summary
    higher_is_better: bool
    run: Callable[..., dict[str, Any]]
    description: str


def _limit(items: list[Any], limit: int | None) -> list[Any]:
    return items if limit is None else items[:limit]


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True)


def same_completions(rows: Sequence[dict[str, Any]], ref: Sequence[dict[str, Any]]) -> float:
    """Share of samples whose completion (cut at the stop strings) equals the reference method's for the same item."""
    return sum(r["completion"] == q["completion"] for r, q in zip(rows, ref, strict=True)) / len(rows)


def refresh_agreement(path: Path | str, note: str | None = None) -> dict[str, Any]:
    """Recompute ``same_completion_as_16bit`` of a stored generation result from its samples and rewrite its JSON and
    CSV (same command, a ``refreshed`` record added, with `note` if given). For files written before commit ecd7ebd,
    which compared outputs including the stop string; every other figure comes from the samples unchanged."""
    path = Path(path)
    result = json.loads(path.read_text())
    samples = result["samples"]
    ref = samples[next(iter(samples))]
    before = {name: s["same_completion_as_16bit"] for name, s in result["summary"].items()}
    for name, s in result["summary"].items():
        s["same_completion_as_16bit"] = same_completions(samples[name], ref)
    result.setdefault("refreshed", []).append({
        "what": "same_completion_as_16bit recomputed from the stored samples (completions cut at the stop strings)",
        "before": before, "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python -c 'from kvarn_eval.evaluate import refresh_agreement; refresh_agreement(\"{path}\")'",
        **({"note": note} if note else {})})
    stem = path.stem
    tag = stem[len(result["task"]) + 1:] if stem != result["task"] else None
    out_dir = path.parent.parent
    if (out_dir / Path(result["model"]).name) != path.parent:
        raise ValueError(f"{path} is not where write_results puts {result['model']}'s {result['task']} results")
    write_results(result, out_dir, result["command"], tag)
    return result


def _generation_task(lm: LoadedModel, methods: list[Method], prompts: list[str], max_new: int,
                     stops: Sequence[str], score: Callable[[int, str], dict[str, Any]], desc: str,
                     prefill_chunk: int | None = None, special_tokens: bool = True) -> dict[str, Any]:
    """Run every method on every prompt (method by method); score each completion. special_tokens: whether the
    tokenizer adds its special tokens (False for prompts already in a chat template, which carries them)."""
    samples: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    encoded = [_ids(lm, p, special_tokens) for p in prompts]
    bar = _progress(len(methods) * len(prompts), desc)
    for method in methods:
        bar.set_postfix_str(method.name)
        for i, ids in enumerate(encoded):
            gen = greedy(lm, ids, method.make(lm.model.config), max_new, stops, prefill_chunk)
            rec = {"index": i, "prompt_tokens": len(ids), **gen,
                   "quantized_share": _quantized_share(method, len(ids), gen["new_tokens"]),
                   **score(i, gen["completion"])}
            samples[method.name].append(rec)
            bar.update(1)
    bar.close()
    ref = samples[methods[0].name]
    summary = {}
    for method in methods:
        rows = samples[method.name]
        new = sum(r["new_tokens"] for r in rows)
        decode_s = sum(r["decode_s"] for r in rows)
        summary[method.name] = {
            "score": sum(r["correct"] for r in rows) / max(len(rows), 1),
            "n": len(rows),
            "same_completion_as_16bit": same_completions(rows, ref),
            "mean_new_tokens": new / len(rows),
            "quantized_share": (sum(r["quantized_share"] * r["new_tokens"] for r in rows) / new) if new else 0.0,
            "decode_tokens_per_s": new / decode_s if decode_s > 0 else None,
        }
    return {"summary": summary, "samples": samples}


def run_gsm8k(lm: LoadedModel, methods: list[Method], limit: int | None, max_new: int = 256, **_: Any) -> dict:
    from .assets import load_split

    shots = load_split("gsm8k", "fewshot")
    docs = _limit(load_split("gsm8k", "test"), limit)
    prompts = [scoring.gsm8k_prompt(d["question"], shots) for d in docs]

    def score(i: int, completion: str) -> dict[str, Any]:
        return {"correct": scoring.gsm8k_correct(completion, docs[i]["answer"]),
                "extracted": scoring.extract_gsm8k_answer(completion), "reference": docs[i]["answer"]}

    out = _generation_task(lm, methods, prompts, max_new, scoring.GSM8K_STOPS, score, "gsm8k")
    out["setup"] = {"shots": len(shots), "max_new_tokens": max_new, "stops": list(scoring.GSM8K_STOPS),
                    "metric": "exact match of the final number (answer is N / last number)",
                    "prefill": "one forward (the prompt reads only 16-bit); generated tokens read the cache"}
    return out


def _code_task(lm: LoadedModel, methods: list[Method], prompts: list[str], programs: Callable[[int, str], str],
               stops: Sequence[str], max_new: int, desc: str, timeout_s: float,
               special_tokens: bool = True) -> dict[str, Any]:
    from .sandbox import run_python

    def score(i: int, completion: str) -> dict[str, Any]:
        res = run_python(programs(i, completion), timeout_s=timeout_s, memory_mb=1024)
        return {"correct": res.passed, "status": res.status, "isolation": res.isolation}

    out = _generation_task(lm, methods, prompts, max_new, stops, score, desc, special_tokens=special_tokens)
    out["setup"] = {"max_new_tokens": max_new, "stops": list(stops), "metric": "pass@1 (greedy, one sample)",
                    "sandbox": {"timeout_s": timeout_s, "memory_mb": 1024}}
    return out


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (instruct models do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def humaneval_prompts(
    tokenizer: Any, prompts: Sequence[str], chat_template: bool | None = None
) -> tuple[list[str], bool]:
    """The HumanEval prompts to generate from, and whether they are in the model's chat template.

    chat_template: None uses the template when the tokenizer has one; True requires one; False gives the plain
    prompts (the function signature and docstring, completed as text). In the template the user asks for the
    function (`scoring.HUMANEVAL_CHAT_REQUEST`) and the assistant's reply opens a Python code block, in which the
    model writes the whole function (stops: `scoring.HUMANEVAL_CHAT_STOPS`, the closing fence). It is scored like a
    plain completion, appended to the prompt: its definition replaces the prompt's docstring-only one. (Opening the
    reply with the prompt itself made instruct models close the block at once.)
    """
    available = has_chat_template(tokenizer)
    if chat_template and not available:
        raise ValueError("--chat-template on: this model's tokenizer has no chat template (use auto or off)")
    use = available if chat_template is None else bool(chat_template)
    if not use:
        return list(prompts), False
    out = []
    for prompt in prompts:
        messages = [{"role": "user", "content": scoring.HUMANEVAL_CHAT_REQUEST.format(prompt=prompt.strip())}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(f"{head}```python\n")
    return out, True


def run_humaneval(lm: LoadedModel, methods: list[Method], limit: int | None, max_new: int = 384,
                  chat_template: bool | None = None, **_: Any) -> dict:
    from .assets import load_split

    docs = _limit(load_split("humaneval", "test"), limit)
    prompts, chat = humaneval_prompts(lm.tokenizer, [d["prompt"] for d in docs], chat_template)
    out = _code_task(lm, methods, prompts,
                     lambda i, c: scoring.humaneval_program(docs[i]["prompt"], c, docs[i]["test"],
                                                            docs[i]["entry_point"]),
                     scoring.HUMANEVAL_CHAT_STOPS if chat else scoring.HUMANEVAL_STOPS, max_new, "humaneval",
                     10.0, special_tokens=not chat)
    out["setup"]["chat_template"] = chat
    out["setup"]["prompt_format"] = ("chat template: request in the user turn, the reply opened as a Python code "
                                     "block; the written function is appended to the prompt" if chat else
                                     "plain: the prompt completed as text")
    return out


def run_mbpp(lm: LoadedModel, methods: list[Method], limit: int | None, max_new: int = 384, **_: Any) -> dict:
    from .assets import load_split

    docs = _limit(load_split("mbpp", "test"), limit)
    return _code_task(lm, methods, [d["prompt"] for d in docs],
                      lambda i, c: scoring.mbpp_program(c, docs[i]["test_list"], docs[i]["test_setup_code"]),
                      scoring.MBPP_STOPS, max_new, "mbpp", 10.0)


def run_needle(lm: LoadedModel, methods: list[Method], limit: int | None, lengths: Sequence[int] = (4096,),
               depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), prefill_chunk: int | None = None,
               **_: Any) -> dict:
    from .assets import fetch_text

    haystack = fetch_text("pg-essays")
    too_long = [n for n in lengths if lm.max_context and n > lm.max_context]
    if too_long:
        raise ValueError(f"context length(s) {too_long} exceed the model's {lm.max_context} positions")
    items = [it for n in lengths for it in make_needle_items(lm.tokenizer, haystack, n, tuple(depths))]
    items = _limit(items, limit)

    def score(i: int, completion: str) -> dict[str, Any]:
        return {"correct": needle_correct(completion, items[i].answer), "answer": items[i].answer,
                "depth": items[i].depth, "length": items[i].context_tokens}

    out = _generation_task(lm, methods, [it.prompt for it in items], 12, ("\n",), score, "needle",
                           prefill_chunk)
    by_length: dict[str, dict[str, float]] = {}
    for name, rows in out["samples"].items():
        for n in lengths:
            sel = [r for r in rows if r["length"] == n]
            if sel:
                by_length.setdefault(name, {})[str(n)] = sum(r["correct"] for r in sel) / len(sel)
        out["summary"][name]["by_length"] = by_length.get(name, {})
    out["setup"] = {"lengths": list(lengths), "depths": list(depths), "haystack": "pg-essays",
                    "prefill": f"chunks of {prefill_chunk}" if prefill_chunk else "one forward",
                    "metric": "first number of the greedy answer equals the needle"}
    return out


# --- log-likelihood -------------------------------------------------------------------------------------------


def _mmlu_docs(limit: int | None, shots: int) -> list[tuple[str, list[str], int]]:
    from .assets import load_split

    dev: dict[str, list[dict[str, Any]]] = {}
    for r in load_split("mmlu", "dev"):
        dev.setdefault(r["subject"], []).append(r)
    test = load_split("mmlu", "test")
    # round-robin over subjects, so a --limit subset covers many subjects
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in test:
        by_subject.setdefault(r["subject"], []).append(r)
    order: list[dict[str, Any]] = []
    queues = [list(v) for v in by_subject.values()]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    letters = "ABCD"

    def block(r: dict[str, Any], answer: bool) -> str:
        opts = "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(r["choices"]))
        return f"{r['question'].strip()}{opts}\nAnswer:" + (f" {letters[r['answer']]}\n\n" if answer else "")

    docs = []
    for r in _limit(order, limit):
        subject = r["subject"].replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        context = head + "".join(block(s, True) for s in dev[r["subject"]][:shots]) + block(r, False)
        docs.append((context, [f" {letters[i]}" for i in range(len(r["choices"]))], r["answer"]))
    return docs


def _arc_docs(limit: int | None, shots: int) -> list[tuple[str, list[str], int]]:
    from .assets import load_split

    items = load_split("arc", "challenge")
    shot_text = "".join(f"Question: {s['question']}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in items[:shots])
    return [(shot_text + f"Question: {r['question']}\nAnswer:", [f" {c}" for c in r["choices"]], r["answer"])
            for r in _limit(items[shots:], limit)]


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = " ".join(text.replace("[header]", "").replace("[step]", "").split())
    return text


def _hellaswag_docs(limit: int | None, shots: int) -> list[tuple[str, list[str], int]]:
    from .assets import load_split

    items = load_split("hellaswag", "validation")

    def query(r: dict[str, Any]) -> str:
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        return _hellaswag_text(r["activity_label"] + ": " + ctx)

    shot_text = "".join(f"{query(s)} {_hellaswag_text(s['endings'][s['answer']])}\n\n" for s in items[:shots])
    return [(shot_text + query(r), [" " + _hellaswag_text(e) for e in r["endings"]], r["answer"])
            for r in _limit(items[shots:], limit)]


LOGLIK_DOCS: dict[str, tuple[Callable[[int | None, int], list[tuple[str, list[str], int]]], int]] = {
    "mmlu": (_mmlu_docs, 5),
    "arc": (_arc_docs, 25),
    "hellaswag": (_hellaswag_docs, 10),
}


@torch.no_grad()
def choice_logprobs(lm: LoadedModel, context: str, choices: Sequence[str], make_cache: Callable[[], Any],
                    chunk: int) -> tuple[list[float], int]:
    """Summed log-probability of each choice after ``context``, the context fed through a cache in chunks.

    The context's last token and each choice go through a copy of the context's cache, so every choice reads
    the same (quantized) history. Returns the scores and the context length in tokens.
    """
    ctx = _ids(lm, context)
    conts = []
    for c in choices:
        whole = _ids(lm, context + c)
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: fall back to separate encoding
            whole = ctx + _ids(lm, c, special=False)
        conts.append(whole[len(ctx) :])
    base = make_cache()
    if len(ctx) > 1:
        feed(lm, ctx[:-1], base, chunk)
    scores = []
    for cont in conts:
        try:
            cache = copy.deepcopy(base)
        except Exception:  # a cache that cannot be copied: rebuild the context for this choice
            cache = make_cache()
            if len(ctx) > 1:
                feed(lm, ctx[:-1], cache, chunk)
        logits = _forward(lm, [ctx[-1], *cont[:-1]], cache).double().log_softmax(-1)
        scores.append(float(logits[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return scores, len(ctx)


def run_loglik(task: str, lm: LoadedModel, methods: list[Method], limit: int | None, chunk: int = 64,
               shots: int | None = None, **_: Any) -> dict:
    build, default_shots = LOGLIK_DOCS[task]
    shots = default_shots if shots is None else shots
    docs = build(limit, shots)
    samples: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    bar = _progress(len(methods) * len(docs), task)
    for method in methods:
        bar.set_postfix_str(method.name)
        t0 = time.perf_counter()
        for i, (context, choices, gold) in enumerate(docs):
            scores, n_ctx = choice_logprobs(lm, context, choices, lambda m=method: m.make(lm.model.config), chunk)
            lengths = [len(c.encode("utf-8")) for c in choices]
            g = _method_group(method)
            quantized = 0 if method.family == "16-bit" else max(0, (n_ctx - 1 - g) // g * g)
            samples[method.name].append({
                "index": i, "scores": scores, "gold": gold, "pred": scoring.pick_choice(scores),
                "pred_norm": scoring.pick_choice(scores, lengths), "context_tokens": n_ctx,
                "quantized_context_share": quantized / n_ctx,
            })
            bar.update(1)
        samples[method.name + "#seconds"] = [{"seconds": time.perf_counter() - t0}]
    bar.close()
    ref = samples[methods[0].name]
    summary = {}
    for method in methods:
        rows = samples[method.name]
        seconds = samples.pop(method.name + "#seconds")[0]["seconds"]
        summary[method.name] = {
            "score": sum(r["pred"] == r["gold"] for r in rows) / len(rows),
            "acc_norm": sum(r["pred_norm"] == r["gold"] for r in rows) / len(rows),
            "n": len(rows),
            "same_choice_as_16bit": sum(r["pred"] == q["pred"] for r, q in zip(rows, ref, strict=True)) / len(rows),
            "mean_context_tokens": sum(r["context_tokens"] for r in rows) / len(rows),
            "quantized_context_share": sum(r["quantized_context_share"] for r in rows) / len(rows),
            "seconds": seconds,
        }
    return {"summary": summary, "samples": samples,
            "setup": {"shots": shots, "chunk": chunk, "metric": "acc (summed log-likelihood); acc_norm per byte",
                      "feeding": f"context fed through the cache in chunks of {chunk} tokens; each choice scored "
                                 "against a copy of that cache"}}


# --- perplexity -----------------------------------------------------------------------------------------------


@torch.no_grad()
def run_perplexity(lm: LoadedModel, methods: list[Method], limit: int | None, tokens: int = 2048, chunk: int = 64,
                   text: str = "wiki", **_: Any) -> dict:
    """All methods in lockstep over one text: each chunk goes through every cache; the 16-bit logits are the
    reference for KL and top-1 (no second 16-bit pass, no stored logits)."""
    from .assets import fetch_text

    n = tokens if limit is None else min(tokens, limit)
    ids = _ids(lm, fetch_text(text))[: n + 1]
    if len(ids) < n + 1:
        raise ValueError(f"text {text!r} has only {len(ids)} tokens, fewer than {n + 1}")
    caches = {m.name: m.make(lm.model.config) for m in methods}
    nll = {m.name: 0.0 for m in methods}
    kl = {m.name: 0.0 for m in methods}
    top1 = {m.name: 0 for m in methods}
    seconds = {m.name: 0.0 for m in methods}
    bar = _progress(n, f"perplexity ({text})")
    for start in range(0, n, chunk):
        piece = ids[start : min(start + chunk, n)]
        target = torch.tensor(ids[start + 1 : start + 1 + len(piece)], device=lm.device)
        ref_logp = None
        for m in methods:
            t0 = time.perf_counter()
            logp = _forward(lm, piece, caches[m.name]).double().log_softmax(-1)
            seconds[m.name] += time.perf_counter() - t0
            if ref_logp is None:
                ref_logp = logp
            nll[m.name] -= float(logp[torch.arange(len(piece)), target].sum())
            kl[m.name] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            top1[m.name] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        bar.update(len(piece))
    bar.close()
    base = math.exp(nll[methods[0].name] / n)
    summary = {}
    for m in methods:
        ppl = math.exp(nll[m.name] / n)
        summary[m.name] = {"score": ppl, "ppl_delta_pct": 100 * (ppl / base - 1), "kl": kl[m.name] / n,
                           "top1_agreement": top1[m.name] / n, "n": n, "seconds": seconds[m.name]}
    return {"summary": summary, "samples": {},
            "setup": {"text": text, "tokens": n, "chunk": chunk,
                      "metric": "perplexity; KL(16-bit || method) in nats per token; top-1 agreement",
                      "feeding": f"text fed through each cache in chunks of {chunk} tokens"}}


TASKS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec("gsm8k", "score", True, run_gsm8k, "GSM8K 8-shot CoT, greedy exact match"),
    "humaneval": TaskSpec("humaneval", "score", True, run_humaneval, "HumanEval pass@1 (greedy, sandboxed)"),
    "mbpp": TaskSpec("mbpp", "score", True, run_mbpp, "MBPP pass@1 (greedy, sandboxed)"),
    "needle": TaskSpec("needle", "score", True, run_needle, "needle/passkey retrieval at 4K-32K"),
    "mmlu": TaskSpec("mmlu", "score", True, lambda *a, **k: run_loglik("mmlu", *a, **k), "MMLU 5-shot acc"),
    "arc": TaskSpec("arc", "score", True, lambda *a, **k: run_loglik("arc", *a, **k), "ARC-Challenge 25-shot acc"),
    "hellaswag": TaskSpec("hellaswag", "score", True, lambda *a, **k: run_loglik("hellaswag", *a, **k),
                          "HellaSwag 10-shot acc"),
    "perplexity": TaskSpec("perplexity", "score", False, run_perplexity,
                           "perplexity, KL and top-1 agreement vs the 16-bit cache"),
}


# --------------------------------------------------------------------------------------------- output


def _git_commit() -> str | None:
    if os.environ.get("KVARN_GIT_COMMIT"):  # runs from an exported snapshot of the tree name their commit here
        return os.environ["KVARN_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(lm: LoadedModel) -> dict[str, Any]:
    import transformers

    device = lm.device
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device, "device_name": device_name, "dtype": str(lm.dtype).replace("torch.", ""),
            "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": platform.python_version(), "git_commit": _git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_task(task: str, lm: LoadedModel, methods: list[Method], limit: int | None = None,
             **options: Any) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    spec = TASKS[task]
    t0 = time.perf_counter()
    out = spec.run(lm, methods, limit, **options)
    slots, d = lm.kv_slots(), lm.head_dim
    for m in methods:
        s = out["summary"][m.name]
        s["family"] = m.family
        s["description"] = m.description
        s["kv_bytes_per_token"] = slots * m.bytes_per_token(d)  # all layers and KV heads, 16-bit activations
        s["bits_per_element"] = 8 * m.bytes_per_token(d) / (2 * d)
    return {"task": task, "description": spec.description, "metric": spec.metric,
            "higher_is_better": spec.higher_is_better, "model": lm.name, "model_source": lm.source,
            "head_dim": d, "kv_slots": slots, "limit": limit, "options": options,
            "seconds": time.perf_counter() - t0, "environment": environment(lm), **out}


def write_results(result: dict[str, Any], out_dir: Path, command: str, tag: str | None = None) -> tuple[Path, Path]:
    """``<out_dir>/<model>/<task>[-<tag>].json`` (everything, samples included) and ``.csv`` (one row per method)."""
    result = {**result, "command": command}
    folder = out_dir / Path(result["model"]).name
    folder.mkdir(parents=True, exist_ok=True)
    stem = result["task"] + (f"-{tag}" if tag else "")
    jpath, cpath = folder / f"{stem}.json", folder / f"{stem}.csv"
    jpath.write_text(json.dumps(result, indent=1, default=str) + "\n")
    keys: list[str] = []
    for s in result["summary"].values():
        keys += [k for k, v in s.items() if k not in keys and not isinstance(v, dict)]
    with open(cpath, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *keys])
        for name, s in result["summary"].items():
            w.writerow([name, *(s.get(k) for k in keys)])
        w.writerow([])
        w.writerow([f"# model {result['model']} ({result['model_source'][:16]}), limit {result['limit']}, "
                    f"{result['environment']['device_name']}, torch {result['environment']['torch']}, "
                    f"transformers {result['environment']['transformers']}"])
        w.writerow([f"# command: {command}"])
    return jpath, cpath


def format_summary(result: dict[str, Any]) -> str:
    task = result["task"]
    n = next(iter(result["summary"].values()))["n"]
    lines = [f"{task} on {result['model']}: {n} item(s)"
             + (f" (--limit {result['limit']})" if result["limit"] else "")
             + f", {result['environment']['device_name']}"]
    setup = result.get("setup", {})
    if "feeding" in setup:
        lines.append(f"  {setup['feeding']}")
    if "prefill" in setup:
        lines.append(f"  prefill: {setup['prefill']}")
    lines.append(f"  {'method':<28}{'score':>10}{'KV B/token':>12}  details")
    for name, s in result["summary"].items():
        extra = {k: v for k, v in s.items() if k not in ("score", "n", "family", "description", "kv_bytes_per_token",
                                                        "bits_per_element", "by_length")}
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
        lines.append(f"  {name:<28}{s['score']:>10.4g}{s['kv_bytes_per_token']:>12,.0f}  {details}")
    return "\n".join(lines)


def _task_args(ap: Any) -> None:
    ap.add_argument("task", choices=list(TASKS), help="what to measure (see `kvarn eval --help` for each)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="a model asset (see `kvarn assets list`) or a Hugging Face folder (default: smollm2-135m)")
    ap.add_argument("--methods", nargs="+", default=["cpu-default"],
                    help="KV-cache methods and groups (16-bit always runs first): e.g. sim:kvarn_k4v2_g128, "
                         "kvarn_k4v2_g128, kvarn_k4v2_g128-norot, kivi-k2v2, quanto-4bit, hf-fp8, or the groups "
                         "presets, sim-presets, ablations, baselines, cpu-default (default)")
    ap.add_argument("--limit", type=int, help="evaluate only the first N items (state it with the results)")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per forward when feeding text through the cache "
                    "(perplexity and log-likelihood tasks; default 64)")
    ap.add_argument("--shots", type=int, help="few-shot examples for mmlu (5), arc (25), hellaswag (10)")
    ap.add_argument("--tokens", type=int, default=2048, help="perplexity: tokens of text (default 2048)")
    ap.add_argument("--text", default="wiki", help="perplexity: text asset (wiki or pg-essays)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096],
                    help="needle: prompt lengths in tokens (default 4096; 8192 16384 32768 for the Qwen models)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="needle: needle positions as fractions of the text")
    ap.add_argument("--prefill-chunk", type=int, help="needle: prefill the prompt in chunks of N tokens "
                    "(as vLLM's chunked prefill) instead of one forward")
    ap.add_argument("--max-new-tokens", type=int, help="generation tasks: cap on generated tokens "
                    "(gsm8k 256, humaneval/mbpp 384)")
    ap.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                    help="humaneval: put the prompt in the model's chat template (auto: when the tokenizer has one; "
                         "the results record which was used)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                    help="hf: transformers caches (CPU or GPU, default); vllm: one vLLM engine per kv_cache_dtype "
                         "(GPU; --model is a Hugging Face folder; methods 16-bit, fp8, turboquant_4bit_nc, presets)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    ap.add_argument("--tag", help="suffix of the result files, e.g. a subset name")


def add_arguments(ap: Any) -> None:
    """The options of `kvarn eval` (shared by the CLI and `python -m kvarn_eval.evaluate`)."""
    _task_args(ap)


def options_from(args: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.task in ("perplexity", "mmlu", "arc", "hellaswag"):
        opts["chunk"] = args.chunk
    if args.task in ("mmlu", "arc", "hellaswag") and args.shots is not None:
        opts["shots"] = args.shots
    if args.task == "perplexity":
        opts.update(tokens=args.tokens, text=args.text)
    if args.task == "needle":
        opts.update(lengths=tuple(args.lengths), depths=tuple(args.depths), prefill_chunk=args.prefill_chunk)
    if args.task in ("gsm8k", "humaneval", "mbpp") and args.max_new_tokens:
        opts["max_new"] = args.max_new_tokens
    if args.task == "humaneval":
        opts["chat_template"] = {"auto": None, "on": True, "off": False}[getattr(args, "chat_template", "auto")]
    return opts


def main(args: Any, argv: Sequence[str]) -> int:
    """Run `kvarn eval` with parsed ``args``; ``argv`` is recorded as the command."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device (torch "
                         f"{torch.__version__}); use --device cpu")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    opts = options_from(args)
    if args.engine == "vllm":
        return _main_vllm(args, argv, opts)
    methods = resolve_methods(args.methods)  # before loading the model: a bad name fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    lm = load(args.model, args.device, dtype)
    result = run_task(args.task, lm, methods, args.limit, **opts)
    command = "kvarn eval " + " ".join(shlex.quote(a) for a in argv)
    jpath, cpath = write_results(result, args.out, command, args.tag)
    print(format_summary(result))
    print(f"wrote {jpath} and {cpath}")
    return 0


def _main_vllm(args: Any, argv: Sequence[str], opts: dict[str, Any]) -> int:
    from kvarn_kernels import PRESETS, KVarNFormat

    from .vllm_engine import kv_cache_dtype, run_vllm_task

    names = ["16-bit", *(m for m in args.methods if m != "16-bit")]
    for name in names:
        kv_cache_dtype(name)  # every name checked before an engine starts
    t0 = time.perf_counter()
    out = run_vllm_task(args.task, args.model, names, args.limit, **opts)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model).get_text_config(decoder=True)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    slots = cfg.num_hidden_layers * cfg.num_key_value_heads
    for name, s in out["summary"].items():
        per_head = (4.0 * d if name == "16-bit" else 2.0 * d if name.startswith("fp8") else
                    KVarNFormat.from_preset(name, d, __import__("torch").float16).bytes_per_token_per_head
                    if name in PRESETS else None)
        s["family"] = "16-bit" if name == "16-bit" else "kvarn" if name in PRESETS else "vllm"
        s["description"] = f"vLLM kv_cache_dtype={s['kv_cache_dtype']}"
        s["kv_bytes_per_token"] = slots * per_head if per_head else float("nan")
        s["bits_per_element"] = 8 * per_head / (2 * d) if per_head else float("nan")
    import vllm

    on_gpu = torch.cuda.is_available()
    env = {"device": "cuda" if on_gpu else "cpu",
           "device_name": torch.cuda.get_device_name() if on_gpu else f"{platform.machine()} CPU (vLLM's CPU build)",
           "dtype": "auto", "torch": torch.__version__, "vllm": vllm.__version__, "git_commit": _git_commit(),
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    import transformers

    env["transformers"] = transformers.__version__
    result = {"task": args.task, "description": TASKS[args.task].description, "metric": "score",
              "higher_is_better": True, "model": args.model, "model_source": str(Path(args.model).resolve()),
              "head_dim": d, "kv_slots": slots, "limit": args.limit, "options": opts,
              "seconds": time.perf_counter() - t0, "environment": env, **out}
    command = "kvarn eval " + " ".join(shlex.quote(a) for a in argv)
    jpath, cpath = write_results(result, args.out, command, args.tag or "vllm")
    print(format_summary(result))
    print(f"wrote {jpath} and {cpath}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvarn_eval.evaluate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args(), sys.argv[1:]))
