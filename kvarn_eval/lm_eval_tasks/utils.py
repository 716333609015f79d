"""Helpers the kvarn_* lm-eval tasks call (`!function utils.NAME`): sandboxed pass@1, MMLU shots, HellaSwag text.

This file is copied beside the task YAMLs by `kvarn_eval.lm_eval_run`, which also writes ``kvarn_data.json`` (the
data folder) next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvarn_eval.sandbox import run_python


def _data_root() -> Path:
    return Path(json.loads((Path(__file__).with_name("kvarn_data.json")).read_text())["data_root"])


def humaneval_programs(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[str]]:
    """The prompt followed by each completion (the function's body)."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def pass_at_1(references: list[str], predictions: list[list[str]]) -> float:
    """1.0 when the first candidate program followed by the tests runs cleanly in the sandbox, else 0.0."""
    program = predictions[0][0] + "\n\n" + references[0] + "\n"
    return float(run_python(program, timeout_s=10.0, memory_mb=1024).passed)


def mmlu_with_shots(dataset: Any) -> Any:
    """Add the 5-shot prefix of each doc's subject (its first five dev examples) as field ``shots``."""
    letters = "ABCD"
    dev: dict[str, list[dict[str, Any]]] = {}
    with open(_data_root() / "mmlu" / "v1" / "dev.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            dev.setdefault(r["subject"], []).append(r)

    def prefix(subject: str) -> str:
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        blocks = []
        for r in dev.get(subject, [])[:5]:
            opts = "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(r["choices"]))
            blocks.append(f"{r['question'].strip()}{opts}\nAnswer: {letters[r['answer']]}\n\n")
        return head + "".join(blocks)

    cache: dict[str, str] = {}
    return dataset.map(lambda doc: {"shots": cache.setdefault(doc["subject"], prefix(doc["subject"]))})


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return " ".join(text.replace("[header]", "").replace("[step]", "").split())


def hellaswag_docs(dataset: Any) -> Any:
    def one(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "endings": [_hellaswag_clean(e) for e in doc["endings"]]}

    return dataset.map(one)
