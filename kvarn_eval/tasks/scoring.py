"""Scoring of the evaluation tasks: answer extraction, program assembly, pass@k, choice selection.

Pure functions with no model in them, so that each can be tested on known answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "GSM8K_STOPS",
    "HUMANEVAL_CHAT_REQUEST",
    "HUMANEVAL_CHAT_STOPS",
    "HUMANEVAL_STOPS",
    "MBPP_STOPS",
    "extract_gsm8k_answer",
    "gsm8k_correct",
    "gsm8k_prompt",
    "humaneval_program",
    "mbpp_program",
    "pass_at_k",
    "pick_choice",
    "truncate_at_stops",
]

GSM8K_STOPS = ("Question:", "\n\n")
# Codex's stops: a new top-level statement ends the function body.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
# The user turn of a HumanEval prompt in a chat template (evaluate.humaneval_prompts); {prompt} is the problem's
# signature and docstring.
HUMANEVAL_CHAT_REQUEST = "Complete the following Python function.\n\n```python\n{prompt}\n```"
# In the chat template the model writes whole functions (helpers, imports): only the end of its code block stops it.
HUMANEVAL_CHAT_STOPS = ("```",)
MBPP_STOPS = ("\n```", "\nassert", "\nprint", "\nif __name__")

_RE_STRICT = re.compile(r"answer is:?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_RE_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def extract_gsm8k_answer(completion: str) -> str | None:
    """The final answer of a chain-of-thought completion: the number after the last "the answer is", else the
    last number in the text; None when there is no number. Commas and dollar signs are dropped."""
    strict = _RE_STRICT.findall(completion)
    found = strict or _RE_NUMBER.findall(completion)
    for candidate in reversed(found):
        if _number(candidate) is not None:
            return candidate.replace(",", "").replace("$", "").rstrip(".")
    return None


def gsm8k_correct(completion: str, reference: str) -> bool:
    """Exact match of the extracted answer with the reference, as numbers ("18.00" equals "18")."""
    got = extract_gsm8k_answer(completion)
    want = _number(reference)
    if got is None or want is None:
        return False
    value = _number(got)
    return value is not None and math.isclose(value, want, rel_tol=0, abs_tol=1e-9)


def gsm8k_prompt(question: str, shots: Sequence[dict[str, str]]) -> str:
    """The standard few-shot chain-of-thought prompt: "Question: ...\\nAnswer: ..." blocks, then the question."""
    blocks = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    return "\n\n".join([*blocks, f"Question: {question}\nAnswer:"])


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: the prompt, the model's function body, the tests and the call to check()."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(completion: str, test_list: Sequence[str], test_setup_code: str = "") -> str:
    """The program MBPP runs: the model's code, the setup code, then each assert."""
    return "\n".join([completion, test_setup_code, *test_list]) + "\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pick_choice(logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """Index of the best choice by summed log-likelihood, or by log-likelihood per unit of ``lengths`` (e.g. bytes,
    lm-eval's acc_norm) when given. Ties go to the first."""
    if lengths is not None:
        if len(lengths) != len(logprobs) or min(lengths) <= 0:
            raise ValueError(f"lengths {list(lengths)} must be positive, one per choice ({len(logprobs)})")
        scores = [lp / n for lp, n in zip(logprobs, lengths, strict=True)]
    else:
        scores = list(logprobs)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
