"""Registration with transformers: the "kvarn" attention and mask functions, and `cache_implementation="kvarn"`.

`register()` is idempotent and runs on `import kvarn_hf`. The attention and mask functions go through transformers'
public interfaces (`AttentionInterface`, `AttentionMaskInterface`). Four things have no public route in the tested
transformers versions, so `register()` wraps private functions, each once, through `_hook`, which refuses (naming the
installed transformers version) a function that is missing or whose parameters changed:
- `GenerationMixin._prepare_cache_for_generation` (the one place where `generate()` creates its cache), so that
  `generate(..., cache_implementation="kvarn", cache_config={...})` builds a `KVarNCache` for the model, and any
  `KVarNCache` used by `generate()` is bound to the model's config, the batch's padding mask and the generation's
  maximum length before the prefill, and in assisted decoding to the prompt's length, from which on verification
  forwards attend like one-token decoding and can be cropped (see `KVarNCache.bind`);
- `masking_utils._preprocess_mask_arguments`, through which a KVarNCache sees each forward's mask arguments before
  the model's layers run (see `_show_masks_to_the_cache`);
- `GenerationMixin._valid_auto_compile_criteria` with `PreTrainedModel.get_compiled_call`, which route decode steps
  to CUDA graphs (see `_route_decode_to_graphs`).
docs/transformers.md says why each is needed and which public routes were examined.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import transformers
from transformers import AttentionInterface, GenerationMixin, PreTrainedModel, masking_utils
from transformers.generation import configuration_utils
from transformers.masking_utils import AttentionMaskInterface

from .attention import kvarn_attention, kvarn_mask
from .cache import KVarNCache

NAME = "kvarn"
_PREPARE_PARAMS = ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"]
_MASK_PARAMS = ["config", "inputs_embeds", "attention_mask", "past_key_values", "position_ids", "layer_idx"]
_COMPILE_CRITERIA_PARAMS = ["self", "model_kwargs", "generation_config"]
_COMPILED_CALL_PARAMS = ["self", "compile_config"]


def _hook(owner: Any, name: str, params: list[str], make: Any, leading: bool = False) -> None:
    """Replace the transformers function `owner.name` by `make(original)`, once (a second call finds the mark).

    params: the parameters it was tested with (leading=True: its first parameters; later ones are passed through).
    A missing function or other parameters raise RuntimeError naming the installed transformers version: the hook
    would otherwise call it wrongly, or silently not run."""
    where = f"{getattr(owner, '__name__', owner)}.{name}"
    original = getattr(owner, name, None)
    if original is None:
        raise RuntimeError(
            f"transformers {transformers.__version__} has no {where}, which kvarn_hf hooks (docs/transformers.md): "
            "install a transformers version in kvarn_hf.SUPPORTED_TRANSFORMERS"
        )
    if getattr(original, "_kvarn", False):
        return
    found = list(inspect.signature(original).parameters)
    if (found[: len(params)] if leading else found) != params:
        raise RuntimeError(
            f"{where} of transformers {transformers.__version__} takes {found}, not the {params} that kvarn_hf was "
            "tested with (docs/transformers.md): install a transformers version in kvarn_hf.SUPPORTED_TRANSFORMERS"
        )
    wrapper = functools.wraps(original)(make(original))
    wrapper._kvarn = True
    setattr(owner, name, wrapper)


def register() -> None:
    """Register attn_implementation="kvarn" and cache_implementation="kvarn" with transformers (idempotent)."""
    AttentionInterface.register(NAME, kvarn_attention)
    AttentionMaskInterface.register(NAME, kvarn_mask)
    if NAME not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS:
        configuration_utils.ALL_CACHE_IMPLEMENTATIONS = (*configuration_utils.ALL_CACHE_IMPLEMENTATIONS, NAME)
    _hook(GenerationMixin, "_prepare_cache_for_generation", _PREPARE_PARAMS, _prepare_cache)
    _route_decode_to_graphs()
    _show_masks_to_the_cache()


def _prepare_cache(original: Any) -> Any:
    """generate()'s cache preparation, which also builds a KVarNCache for cache_implementation="kvarn" and binds any
    KVarNCache to the model (see the module docstring)."""

    def prepare_cache(
        self: Any, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int,
        max_cache_length: int,
    ) -> Any:
        if generation_config.cache_implementation == NAME:
            if model_kwargs.get("past_key_values") is not None:
                raise ValueError(
                    "pass either cache_implementation='kvarn' or a past_key_values cache to generate(), not both"
                )
            cache_config = copy.deepcopy(generation_config.cache_config or {})
            model_kwargs["past_key_values"] = KVarNCache(config=self.config, **cache_config)
            result = None
        else:
            result = original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        cache = model_kwargs.get("past_key_values")
        if isinstance(cache, KVarNCache):
            mask = model_kwargs.get("attention_mask")
            assisted = getattr(generation_mode, "value", generation_mode) == "assisted_generation"
            verify_from = _prompt_length(generation_config, mask, cache) if assisted else None
            cache.bind(self.config, mask, max_cache_length, verify_from=verify_from)
        return result

    return prepare_cache


def _prompt_length(generation_config: Any, mask: Any, cache: KVarNCache) -> int:
    """The prompt's length in generate() (padding included): the first position that a verification forward must
    give its one-token-decoding history. From the mask, else from what generate() recorded when it dropped an all-ones
    mask (transformers >= 5.20), else max_length - max_new_tokens; failing all, the cache's length (the first forward
    is then verified like drafts)."""
    if mask is not None:
        return mask.shape[-1]
    recorded = getattr(generation_config, "_mask_length", None)
    if isinstance(recorded, int):
        return recorded
    if generation_config.max_new_tokens is not None and generation_config.max_length is not None:
        return generation_config.max_length - generation_config.max_new_tokens
    return cache.get_seq_length()


def _show_masks_to_the_cache() -> None:
    """Let a KVarNCache give the dense path's mask of a verification forward (`KVarNCache.verification_mask`).

    transformers builds every mask of a forward through `masking_utils._preprocess_mask_arguments`, the one place
    where the model's config, its 2-D attention mask and its cache meet, before any layer runs; a mask returned from
    there as an early exit is what the layers get.
    """
    _hook(masking_utils, "_preprocess_mask_arguments", _MASK_PARAMS, _preprocess_masks, leading=True)


def _preprocess_masks(original: Any) -> Any:
    def preprocess(
        config: Any, inputs_embeds: Any, attention_mask: Any, past_key_values: Any, position_ids: Any,
        layer_idx: Any, *args: Any, **kwargs: Any,
    ) -> Any:
        if isinstance(past_key_values, KVarNCache):
            past_key_values.prepare_forward(config, attention_mask)
        result = original(config, inputs_embeds, attention_mask, past_key_values, position_ids, layer_idx, *args,
                          **kwargs)
        if isinstance(past_key_values, KVarNCache) and not result[0]:
            mask = past_key_values.verification_mask(config, inputs_embeds, layer_idx)
            if mask is not None:  # (early exit, the mask, and nothing else)
                return (True, mask, *(None,) * (len(result) - 2))
        return result

    return preprocess


def _route_decode_to_graphs() -> None:
    """Make `generate()` run a KVarNCache's decode steps through `graphs.DecodeGraphs`.

    generate() asks `_valid_auto_compile_criteria` whether to decode with `get_compiled_call(...)` (torch.compile)
    instead of the model; for a KVarNCache that wants graphs (`KVarNCache.wants_decode_graphs`) the first answers
    yes and the second returns the cache's graph runner. `generation_config.disable_compile=True` turns it off.
    """
    _hook(GenerationMixin, "_valid_auto_compile_criteria", _COMPILE_CRITERIA_PARAMS, _compile_criteria)
    _hook(PreTrainedModel, "get_compiled_call", _COMPILED_CALL_PARAMS, _compiled_call)


def _compile_criteria(valid: Any) -> Any:
    def valid_auto_compile_criteria(self: Any, model_kwargs: dict, generation_config: Any) -> bool:
        cache = model_kwargs.get("past_key_values")
        if (isinstance(cache, KVarNCache) and not generation_config.disable_compile
                and cache.wants_decode_graphs(self)):
            self._kvarn_graph_cache = cache
            return True
        self.__dict__.pop("_kvarn_graph_cache", None)
        return valid(self, model_kwargs, generation_config)

    return valid_auto_compile_criteria


def _compiled_call(compiled: Any) -> Any:
    def get_compiled_call(self: Any, compile_config: Any) -> Any:
        cache = self.__dict__.pop("_kvarn_graph_cache", None)
        if cache is not None:
            return cache.decode_graphs_for(self)
        return compiled(self, compile_config)

    return get_compiled_call
