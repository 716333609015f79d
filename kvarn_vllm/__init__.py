"""KVarN for vLLM: `vllm serve MODEL --kv-cache-dtype kvarn_k4v2_g128`, loaded as a plugin.

vLLM calls `register()` through the `vllm.general_plugins` entry point in every process (API server, engine
core, workers) before it builds configs or models; nothing else is needed from the user.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """Teach vLLM the KVarN cache dtypes (idempotent). Raises a clear error on an unsupported vLLM release."""
    global _REGISTERED
    if _REGISTERED:
        return
    import vllm

    from .compat import install

    install(vllm.__version__)
    _REGISTERED = True


__all__ = ["register"]
