"""The "kvarn" attention and mask functions that transformers calls when a model runs with attn_implementation="kvarn".

With a `KVarNCache` in fused mode, a layer's `update()` returns a `PendingKV` handle instead of dense tensors; the
attention function below hands it back to the layer, which attends straight from the packed tiles through the
kernel core (the dequantized history is never materialized) and then appends the new tokens. Anything else (no
cache, a `DynamicCache`, the 16-bit sliding-window layers of Gemma-3) arrives as dense tensors and goes through
transformers' own SDPA function with the mask that the stock SDPA builder would have made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .cache import PendingKV


@dataclass
class KVarNMask:
    """What the "kvarn" mask builder gives the attention layers.

    `padding` is the 2-D attention mask of the call (True = real token, shape [B, past + new]) or None; the fused
    path needs only that (its causal mask is implicit and padded tokens never enter the cache). `dense()` builds the
    4-D boolean mask that stock SDPA would get, lazily, for layers that still attend over dense tensors.
    """

    padding: torch.Tensor | None
    sdpa_kwargs: dict[str, Any] = field(repr=False)
    _dense: Any = field(default=None, init=False, repr=False)
    _built: bool = field(default=False, init=False, repr=False)

    def dense(self) -> torch.Tensor | None:
        if not self._built:
            self._dense = sdpa_mask(**self.sdpa_kwargs)
            self._built = True
        return self._dense


def kvarn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> KVarNMask:
    """Mask builder registered under "kvarn" (same arguments as transformers' `sdpa_mask`)."""
    sdpa_kwargs = dict(
        kwargs,
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
    )
    return KVarNMask(padding=attention_mask, sdpa_kwargs=sdpa_kwargs)


def kvarn_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered under "kvarn": returns (output [B, q_len, Hq, D], None)."""
    if not isinstance(key, PendingKV):
        mask = attention_mask.dense() if isinstance(attention_mask, KVarNMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)

    if dropout:
        raise ValueError(f"kvarn attention is for inference: attention dropout {dropout} is not supported (use eval())")
    if softcap is not None:
        raise ValueError(
            f"attention logit soft-capping ({softcap}) is not supported by the fused KVarN kernels: load the model "
            "with attn_implementation='sdpa' to use KVarNCache with it"
        )
    if sliding_window is not None:
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention (window {sliding_window}) but "
            "holds KVarN tiles: build the cache with KVarNCache(config=model.config) so that sliding layers keep a "
            "16-bit window"
        )
    if attention_mask is not None and not isinstance(attention_mask, KVarNMask):
        raise ValueError(
            "kvarn attention got a custom attention mask: the fused path supports causal attention with left "
            "padding only (pass a 2-D attention_mask)"
        )
    padding = attention_mask.padding if attention_mask is not None else None
    return key.layer.attend(query, key, scaling, padding), None
