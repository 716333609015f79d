"""Which models a KVarNCache can serve: checks of a model config, and the cache layer kind of each model layer."""

from __future__ import annotations

from typing import Any

from kvarn_kernels import KVarNFormat


def is_fused(config: Any) -> bool:
    return getattr(config, "_attn_implementation", None) == "kvarn"


def layer_kinds(config: Any, preset: str) -> list[int | None]:
    """Refuse models KVarNCache cannot serve; returns per layer None (KVarN) or the sliding window (16-bit)."""
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("KVarNCache serves decoder-only models; encoder-decoder models are not supported")
    if getattr(text, "num_kv_shared_layers", 0) or getattr(text, "kv_sharing_modes", None):
        raise ValueError("models that share KV caches between layers are not supported by KVarNCache")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    try:
        KVarNFormat.from_preset(preset, head_dim)
    except ValueError as e:
        raise ValueError(f"KVarNCache cannot serve this model: {e}") from None
    if is_fused(config) and getattr(text, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            "the fused KVarN kernels do not implement attention logit soft-capping: load the model with "
            "attn_implementation='sdpa' to use KVarNCache with it"
        )
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
    kinds: list[int | None] = []
    for i, kind in enumerate(types):
        if kind == "full_attention":
            kinds.append(None)
        elif kind == "sliding_attention" and window is not None:
            kinds.append(window)
        else:
            raise ValueError(
                f"layer {i} is {kind!r}: KVarNCache serves full-attention layers and keeps sliding-window layers "
                "in 16-bit; other layer types are not supported"
            )
    if all(k is not None for k in kinds):
        raise ValueError(
            f"every layer of this model uses sliding-window attention (window {window}), which KVarNCache keeps in "
            "16-bit: it would quantize nothing. If the model was trained without a window, set "
            "config.sliding_window = None"
        )
    return kinds
