"""CUDA-graph decode for `KVarNCache` in fused mode: one replay per generated token instead of ~1000 launches.

A decode step of a transformers model is a thousand small kernel launches, issued by Python: on a GPU the host,
not the GPU, sets the pace (H100, 2026-11-23, 121a2c8: 33-81 ms of wall time per step for 2.4-20 ms of
kernels). A KVarNCache is paged and preallocated, so a decode step can be captured once and replayed: every tensor
it reads keeps its storage, and what changes from step to step (where each row's new token goes, the row lengths)
lives in small device buffers (`cache.StaticDecode`) that are refilled before each replay.

`DecodeGraphs` is what `generate()` calls instead of the model for decode steps (register.py routes it through
transformers' compiled-forward hook, in place of torch.compile). Per call it either
- replays a captured graph (a plain decode step: one token per row, none completes a tile), or
- runs the model eagerly: prefills, chunks, the one step in G where a row completes a tile (its quantize launch
  and block-table update), steps with outputs a graph cannot give (attentions, hidden states), and every step
  after the cache's batch was edited (beam search reorders it every step).

The attention kernel's split grid is fixed in a graph, so graphs are captured per history bucket (quarter-octave
steps of the tile count, from MIN_BUCKET_TILES): a graph's splits cover its bucket, and rows that are shorter leave
some splits idle. A new bucket costs one eager warm-up step (it compiles the kernel variant) and one capture.
Graphs are dropped, and recaptured when needed, if any tensor they read was reallocated (tile storage growth,
reset), which `_pointers` checks before every replay.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import torch
import triton
from transformers.modeling_outputs import CausalLMOutputWithPast

from .layer import KVarNLayer

# Smallest history bucket, in tiles, of a captured decode graph.
MIN_BUCKET_TILES = 16
# Keyword arguments a graphed decode step can take (anything else runs eagerly).
_STATIC_KWARGS = {"input_ids", "position_ids", "past_key_values", "use_cache", "return_dict", "logits_to_keep",
                  "attention_mask"}


def capture_by_default() -> bool:
    """Whether runners made with capture=None capture CUDA graphs: yes unless KVARN_NO_CAPTURE=1, read at each call
    so that setting the variable after `import kvarn_hf` takes effect (docs/environment.md)."""
    return os.environ.get("KVARN_NO_CAPTURE") != "1"


def bucket_tiles(tiles: int, width: int) -> int:
    """The history bucket (in tiles) of a step whose longest row holds `tiles` tiles: the next quarter-octave
    size from MIN_BUCKET_TILES on (16, 20, 24, 28, 32, 40, ...), capped at the block table's width."""
    size = MIN_BUCKET_TILES
    while size < tiles:
        octave = triton.next_power_of_2(size + 1) // 2  # the power of two at or below size
        size += max(octave // 4, 1)
    return max(min(size, width), tiles)


class DecodeGraphs:
    """Decode steps of `model` over `cache` (a `KVarNCache`), replayed from CUDA graphs (see the module docstring).

    Call it like the model (`generate()` does); `stats` counts replays, captures and eager steps.

    capture: capture CUDA graphs on CUDA devices (True), run the same static steps eagerly (False: how the CPU tests
    exercise this class and how GPU tests compare a replay with its own eager run), or None (the default): capture
    unless the environment sets KVARN_NO_CAPTURE=1 (`capture_by_default`).
    """

    def __init__(self, model: torch.nn.Module, cache: Any, capture: bool | None = None) -> None:
        if capture is not None and not isinstance(capture, bool):
            raise ValueError(f"capture must be None (from KVARN_NO_CAPTURE), True or False, got {capture!r}")
        self._model = weakref.ref(model)
        self.cache = cache
        self._capture = capture
        self._graphs: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._warm: set[tuple] = set()
        self._pool: Any = None
        self._pointers: tuple[int, ...] | None = None
        self.stats = {"replays": 0, "captures": 0, "static_eager": 0, "eager": 0}

    @property
    def capture(self) -> bool:
        """Whether static steps are captured and replayed (on CUDA, unless capture=False or KVARN_NO_CAPTURE=1) or run
        eagerly. Decided per call: the runner is made before the prefill, when the cache does not know its device."""
        wanted = capture_by_default() if self._capture is None else self._capture
        device = self.cache._paging.device
        return wanted and device is not None and device.type == "cuda"

    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of these decode graphs was deleted")
        return model

    def __call__(self, **kwargs: Any) -> Any:
        key = self._static_key(kwargs)
        if key is None:
            self.stats["eager"] += 1
            return self.model(**kwargs)
        paging = self.cache._paging
        tiles = max(0, max(paging.real_lengths(paging.length).tolist()) - paging.group) // paging.group
        bucket = bucket_tiles(tiles, paging.block_table.shape[1])
        key = (*key, bucket)
        step = paging.begin_static_step(paging.group * (bucket + 1))
        if step is None:
            self.stats["eager"] += 1
            return self.model(**kwargs)
        try:
            return self._run(key, kwargs)
        finally:
            paging.end_static_step()

    # --- internals ----------------------------------------------------------------------------------------
    def _static_key(self, kwargs: dict[str, Any]) -> tuple | None:
        """The graph key of a call that can run as a static decode step, or None."""
        cache = self.cache
        ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
        if (
            cache._graphs_off
            or cache._paging.pads is None
            or kwargs.get("past_key_values") is not cache
            or not set(kwargs) <= _STATIC_KWARGS
            or not kwargs.get("use_cache", True)
            or not cache.fused
            or ids is None
            or pos is None
            or ids.dim() != 2
            or ids.shape[1] != 1
            or ids.shape[0] != cache._paging.batch
            or not all(isinstance(layer, KVarNLayer) and layer.is_initialized for layer in cache.layers)
        ):
            return None
        return (tuple(ids.shape), tuple(pos.shape), ids.dtype, pos.dtype, kwargs.get("logits_to_keep", 0))

    def _run(self, key: tuple, kwargs: dict[str, Any]) -> Any:
        layers = self.cache.layers
        pointers = self._current_pointers()
        if pointers != self._pointers:  # a tensor the graphs read was reallocated: they are stale
            self._graphs.clear()
            self._pool = None  # released with its last graph: a new capture must not name it
            self._pointers = pointers
        if key in self._graphs:
            graph, ids, pos, logits = self._graphs[key]
            ids.copy_(kwargs["input_ids"])
            pos.copy_(kwargs["position_ids"])
            graph.replay()
            for layer in layers:  # what the layers' Python would have done
                layer.length += 1
            self.stats["replays"] += 1
            return CausalLMOutputWithPast(logits=logits, past_key_values=self.cache)
        static = {"input_ids": kwargs["input_ids"].clone(), "position_ids": kwargs["position_ids"].clone(),
                  "past_key_values": self.cache, "use_cache": True, "return_dict": True}
        if "logits_to_keep" in kwargs:
            static["logits_to_keep"] = kwargs["logits_to_keep"]
        if not self.capture or key not in self._warm:
            # First step of a bucket: an eager run of the static step compiles its kernel variants outside any
            # capture (a capture records launches, it does not run them).
            self._warm.add(key)
            self.stats["static_eager"] += 1
            out = self.model(**static)
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=self.cache)
        lengths = [layer.length for layer in layers]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.model(**static)
        except Exception as e:  # noqa: BLE001 - e.g. a model whose forward synchronizes: decode eagerly instead
            for layer, length in zip(layers, lengths, strict=True):
                layer.length = length
            self.cache._graphs_off = True
            warnings.warn(f"KVarNCache: capturing a decode step in a CUDA graph failed ({type(e).__name__}: {e}); "
                          "decoding without graphs from here on", RuntimeWarning, stacklevel=2)
            self.stats["static_eager"] += 1
            out = self.model(**static)
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=self.cache)
        self._pool = graph.pool()
        for layer, length in zip(layers, lengths, strict=True):  # the capture ran the Python, not the kernels
            layer.length = length
        self._graphs[key] = (graph, static["input_ids"], static["position_ids"], out.logits)
        self.stats["captures"] += 1
        return self._run(key, kwargs)

    def _current_pointers(self) -> tuple[int, ...]:
        paging = self.cache._paging
        ptrs = [paging.block_table.data_ptr(), paging.dense_table.data_ptr(), paging.static.meta.data_ptr()]
        for layer in self.cache.layers:
            for t in (layer.tiles, layer.pool_k, layer.pool_v, layer.query_energy):
                ptrs.append(0 if t is None else t.data_ptr())
        return tuple(ptrs)

