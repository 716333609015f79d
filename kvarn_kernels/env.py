"""The environment variables the kernel core reads, read in one place (docs/environment.md lists every variable of
the project)."""

from __future__ import annotations

import os


def interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in its interpreter (on CPU; its bfloat16 dots are wrong)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def force_triton() -> bool:
    """KVARN_FORCE_TRITON=1: `ops` runs the Triton kernels on CPU tensors too (under TRITON_INTERPRET=1)."""
    return os.environ.get("KVARN_FORCE_TRITON") == "1"


def skip_self_check() -> bool:
    """KVARN_SKIP_SELFCHECK=1: `ops` skips its first-use comparison of the Triton kernels with the reference."""
    return os.environ.get("KVARN_SKIP_SELFCHECK") == "1"


def check_tables() -> bool:
    """KVARN_CHECK_TABLES=1: every attention call validates the block and dense tables first (syncs; debugging)."""
    return os.environ.get("KVARN_CHECK_TABLES") == "1"
