"""KVarN for transformers: `KVarNCache` for `model.generate`, and attn_implementation="kvarn" (fused attention).

    import kvarn_hf                       # registers "kvarn" with transformers
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="kvarn")
    model.generate(**inputs, past_key_values=kvarn_hf.KVarNCache())
"""

from __future__ import annotations

import os

import transformers
from packaging.version import Version

SUPPORTED_TRANSFORMERS = (Version("5.17.0"), Version("5.24.0"))  # [low, high): the versions the tests ran on

_installed = Version(transformers.__version__)
if not SUPPORTED_TRANSFORMERS[0] <= _installed < SUPPORTED_TRANSFORMERS[1] and not os.environ.get(
    "KVARN_ALLOW_ANY_TRANSFORMERS"
):
    raise ImportError(
        f"kvarn_hf supports transformers >= {SUPPORTED_TRANSFORMERS[0]}, < {SUPPORTED_TRANSFORMERS[1]} (the Cache "
        f"API changes within 5.x); found {_installed}. Install a supported version, or set "
        "KVARN_ALLOW_ANY_TRANSFORMERS=1 to try anyway."
    )

from .attention import KVarNMask, kvarn_attention, kvarn_mask  # noqa: E402
from .cache import KVarNCache, KVarNLayer, PendingKV  # noqa: E402
from .register import register  # noqa: E402

register()

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "KVarNCache",
    "KVarNLayer",
    "KVarNMask",
    "PendingKV",
    "kvarn_attention",
    "kvarn_mask",
    "register",
]
