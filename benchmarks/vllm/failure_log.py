"""What a failed vLLM engine's output says about why: its first error block, not the progress bars after it.

CUDA-graph capture prints hundreds of progress lines, and a plain tail of a failed run's output then holds only those
(the cause of a failure on the GPU was lost that way once).
"""

from __future__ import annotations

import re

_PROGRESS = re.compile(r"\d+%\|.*\||it/s\]|s/it\]")
_ERROR = re.compile(r"Traceback \(most recent call last\)|\bERROR\b|Error:")


def failure_excerpt(text: str, before: int = 5, block: int = 60, tail: int = 30) -> str:
    """The first error block of `text` (from `before` lines ahead of the first traceback or ERROR line, `block`
    lines long) and its last `tail` lines, with progress-bar lines dropped."""
    lines = [ln for ln in text.splitlines() if not _PROGRESS.search(ln)]
    first = next((i for i, ln in enumerate(lines) if _ERROR.search(ln)), None)
    parts = []
    if first is not None:
        parts.append("\n".join(lines[max(0, first - before): first + block]))
    if first is None or first + block < len(lines) - tail:
        parts.append("\n".join(lines[-tail:]))
    return "\n...\n".join(parts)
