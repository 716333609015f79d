"""Needle-in-a-haystack / passkey prompts in the style of RULER's single-needle task, built from essay text.

One "special magic number" sentence is placed at a chosen depth of a long filler text (Paul Graham's essays); the
prompt ends by asking for the number, so the answer must be read back from the cache across the whole context.
NLTK is not available here, so sentences are split with a regular expression.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["NeedleItem", "make_needle_items", "needle_correct", "split_sentences"]

_KEYS = ("amber-falcon", "quiet-harbor", "silver-maple", "rapid-comet", "hollow-ridge", "crimson-delta",
         "frozen-lantern", "golden-orchid", "velvet-summit", "copper-meadow", "misty-canyon", "lunar-willow")
_INTRO = ("A special magic number is hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the number afterwards.\n\n")
_RE_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class NeedleItem:
    key: str
    answer: str  # the 7-digit number
    depth: float  # where the needle sits, as a fraction of the filler text
    prompt: str
    context_tokens: int  # the target prompt length in tokens


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after '.', '!' or '?' followed by white space (no NLTK here)."""
    return [s for s in _RE_SENTENCE_END.split(text.strip()) if s]


def _question(key: str) -> str:
    return (f"\n\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


def make_needle_items(tokenizer: Any, haystack: str, context_tokens: int, depths: tuple[float, ...],
                      seed: int = 0) -> list[NeedleItem]:
    """One prompt of about ``context_tokens`` tokens per depth (0 = start of the filler, 1 = end)."""
    if context_tokens < 256:
        raise ValueError(f"context_tokens={context_tokens} is too short for a needle prompt (at least 256)")
    rng = random.Random(seed * 1_000_003 + context_tokens)
    sentences = split_sentences(haystack)
    lengths = [len(tokenizer(" " + s, add_special_tokens=False).input_ids) for s in sentences[:20000]]
    items = []
    for i, depth in enumerate(depths):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} must lie in [0, 1]")
        key = _KEYS[(i + context_tokens) % len(_KEYS)]
        answer = str(rng.randrange(1_000_000, 10_000_000))
        needle = f"One of the special magic numbers for {key} is: {answer}."
        fixed = len(tokenizer(_INTRO + needle + _question(key), add_special_tokens=False).input_ids)
        budget = context_tokens - fixed
        filler, used = [], 0
        for s, n in zip(sentences, lengths, strict=False):
            if used + n > budget:
                break
            filler.append(s)
            used += n
        if used < budget // 2:
            raise ValueError(f"the haystack text is too short for {context_tokens} tokens")
        at = round(depth * len(filler))
        body = " ".join([*filler[:at], needle, *filler[at:]])
        items.append(NeedleItem(key, answer, depth, _INTRO + body + _question(key), context_tokens))
    return items


def needle_correct(completion: str, answer: str) -> bool:
    """True when the first number in the completion is the needle's number."""
    m = re.search(r"\d[\d,]*", completion)
    return m is not None and m.group(0).replace(",", "") == answer
