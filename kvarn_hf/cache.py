"""KVarNCache: the transformers Cache that builds its layers for a model, checks what it is given, and edits
(crops, reorders, resets) its layers as a whole.

Layout, per batch row and full-attention layer (the kernel core's `PagedKV`): the row's first G real tokens stay
16-bit for its whole life (the sink), every later full tile of G tokens is quantized once, when it fills, into a
growable paged uint8 cache, and the newest partial tile stays 16-bit (the tail). Tiles are append-only: history is
never re-quantized.

Left padding: each row's tokens are counted from its first real token, so the sink starts there and padded
positions never enter a tile's statistics. The cache learns the padding from the 2-D attention mask of its first
forward (`prepare_forward`, which register.py calls before the model's layers run; `generate()` also hands it over
in `bind`). Rows may therefore fill their tiles at different steps.

Two modes, picked from the model's attention implementation:
- fused (attn_implementation="kvarn"): `update()` returns a `PendingKV` handle; the registered attention function
  calls `KVarNLayer.attend`, which attends over packed tiles + 16-bit sink/tail + the new tokens through
  `kvarn_kernels.ops.paged_attention`, then appends the new tokens.
- dense (eager, sdpa, ...): `update()` returns the dequantized history followed by the new 16-bit tokens, in the
  padded frame the model's own mask expects, like the stock QuantizedCache.
In both modes a forward pass sees the history as stored before it and its own new tokens in 16-bit, except a
verification forward of speculative decoding (`bind(verify_from=...)`), whose every token sees what it would see in
one-token decoding (verify.py).

Sliding-window layers (Gemma-3's local layers) keep transformers' 16-bit rolling window (`DynamicSlidingWindowLayer`):
their window is short and rolls, which does not fit append-only tiles; only full-attention layers are quantized.

Where the parts live: `placement.py` (where each new token goes), `paging.py` (the paging state all KVarN layers of
a cache share), `layer.py` (one layer's storage and attention), `verify.py` (verification forwards), `checks.py`
(which models can be served), `graphs.py` (CUDA-graph decode).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from kvarn_kernels import DEFAULT_PRESET, PRESETS

from . import verify
from .checks import is_fused, layer_kinds
from .graphs import DecodeGraphs
from .layer import KVarNLayer, PendingKV
from .paging import Paging

__all__ = ["KVarNCache", "KVarNLayer", "PendingKV"]

# How KVarNCache chooses each K tile's frame (see KVarNCache).
K_FRAME_RULES = ("range", "sink-queries")
# What to do when a cache meets a model it was not filled by.
REUSE = ("a KVarNCache holds the keys and values of the model that filled it: use a new KVarNCache() for this model, "
         "or call reset() on this one first")


class KVarNCache(Cache):
    """A transformers Cache that stores full-attention layers as KVarN tiles (see the module docstring).

    `KVarNCache()` uses the default preset (kvarn_k4v2_g128) and builds its layers as the model reaches them;
    `KVarNCache(preset=..., config=model.config)` builds them up front, keeps sliding-window layers in a 16-bit
    window, refuses models it cannot serve, and picks fused mode when the model runs attn_implementation="kvarn".
    `generate()` binds a config-less cache to the model's config itself.

    keep_last_tile: also keep a 16-bit copy of each row's newest quantized tile (one more tile of 16-bit memory per
    row and layer), so that `crop` can undo up to tail + G tokens exactly. Assisted `generate()` needs more (a
    verification forward may complete several tiles): it binds the cache with `verify_from` (see `bind`).

    k_frame: how each K tile's frame (rotated or not) is chosen. "range" (default): from the tile alone
    (`reference.choose_k_rotation`). "sink-queries": each channel's range cost weighted by the row's sink queries'
    mean squared value per channel (`reference.sink_query_weights`; fused path only; it keeps a float32 energy per
    position of the sink and tail blocks: twice the bytes of their 16-bit keys), which lowered attention KL by
    10–15 % on Qwen2.5 and SmolLM2 in reports/rotation_choice.
    """

    def __init__(
        self, preset: str = DEFAULT_PRESET, config: Any | None = None, keep_last_tile: bool = False,
        k_frame: str = "range", decode_graphs: bool | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is unknown: use one of {', '.join(PRESETS)}")
        if k_frame not in K_FRAME_RULES:
            raise ValueError(f"k_frame {k_frame!r} is unknown: use one of {', '.join(K_FRAME_RULES)}")
        if decode_graphs not in (None, True, False):
            raise ValueError(f"decode_graphs must be None (auto), True or False, got {decode_graphs!r}")
        self.preset = preset
        self.decode_graphs = decode_graphs
        self._decoder: Any = None  # graphs.DecodeGraphs of the model that generates with this cache
        self._graphs_off = False  # set by batch edits of a filled cache (beam search): decode runs eagerly
        self._paging = Paging(PRESETS[preset][2], keep_last_tile, k_frame)
        self._config_id: int | None = None  # id() of the config the layers were last adopted for (see _adopt)
        if config is None:
            super().__init__(layer_class_to_replicate=partial(KVarNLayer, self._paging, preset))
        else:
            super().__init__(layers=[])
            self._adopt(config)

    @property
    def fused(self) -> bool:
        """Whether update() hands attention packed tiles (attn_implementation='kvarn') or dense tensors."""
        return self._paging.fused

    # --- binding to a model ------------------------------------------------------------------------------
    def bind(
        self, config: Any, attention_mask: torch.Tensor | None = None, max_length: int | None = None,
        keep_last_tile: bool = False, verify_from: int | None = None,
    ) -> None:
        """Adopt a model's config (layer types, fused or dense mode), its batch's padding and a length to reserve.

        `generate()` calls this before the prefill; call it yourself when driving the model by hand.

        verify_from: for speculative decoding, the length of the prompt (padding included). Every position from there
        on attends to the same history as in one-token decoding, however many tokens a forward verifies (each sees
        the tiles completed before it as quantized, the rest in 16-bit), and `crop` can undo any part of the latest
        forward past the prompt (the tiles it completed keep a 16-bit copy until the next forward that completes
        tiles). Assisted `generate()` passes the prompt length; None (the default) turns it off.
        """
        self._adopt(config)
        self._paging.keep_last_tile |= keep_last_tile
        self._paging.verify_from = verify_from
        if attention_mask is not None:
            self.set_padding(attention_mask)
        if max_length:
            self.reserve(max_length)

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Tell the cache which leading positions of each row are padding (a 2-D mask, 1 = real token).

        The cache learns it by itself from the attention mask of its first forward (`generate()`, or a model called
        by hand with `attention_mask=`); call this only to set it before that. On a filled cache the mask must match
        the stored padding.
        """
        self._paging.set_pads(attention_mask)

    def prepare_forward(self, config: Any, attention_mask: Any) -> None:
        """What a KVarNCache learns from a forward before the model's layers run (register.py calls this from
        transformers' mask preparation): the model's config (an empty cache builds its layers for it, a filled one
        refuses a model that did not fill it) and, at the first forward, the batch's left padding from its 2-D mask.
        """
        self._adopt(config)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and self._paging.pads is None:
            self._paging.set_pads(attention_mask)

    def _adopt(self, config: Any) -> None:
        """Take the layer types and attention mode of the model that is about to run: an empty cache builds its
        layers for it (a 16-bit window for sliding-window layers), a filled one checks that it fits."""
        if id(config) == self._config_id:
            return
        kinds = layer_kinds(config, self.preset)
        if self._filled():
            self._check_model(config, kinds)
        else:
            self.layers = [KVarNLayer(self._paging, self.preset) if window is None
                           else DynamicSlidingWindowLayer(window) for window in kinds]
            self.layer_class_to_replicate = None
        self._paging.fused = is_fused(config)
        self._config_id = id(config)

    def _filled(self) -> bool:
        return any(layer.is_initialized for layer in self.layers)

    def _check_model(self, config: Any, kinds: list[int | None]) -> None:
        """Refuse a model whose layers differ from those of the model that filled this cache."""
        if len(kinds) != len(self.layers):
            raise ValueError(f"this KVarNCache holds {len(self.layers)} layers but the model has {len(kinds)}: {REUSE}")
        for i, (layer, window) in enumerate(zip(self.layers, kinds, strict=True)):
            if isinstance(layer, KVarNLayer) and window is not None:
                raise ValueError(
                    "this KVarNCache was filled without the model's config, so its sliding-window layers were "
                    f"quantized as full attention (layer {i}): build it with KVarNCache(config=model.config), or let "
                    "a model run it from empty (it adopts the model's layer types at its first forward); or call "
                    "reset() on this one first"
                )
            if not isinstance(layer, KVarNLayer) and window is None:
                raise ValueError(f"layer {i} of this KVarNCache is a 16-bit sliding window but a full-attention layer "
                                 f"of the model: {REUSE}")
        text = config.get_text_config(decoder=True)
        want = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, KVarNLayer) and layer.is_initialized:
                held = (layer.pool_k.shape[1], layer.pool_k.shape[3])
                if held != want:
                    raise ValueError(f"layer {i} of this KVarNCache holds KV heads {held[0]}, head_dim {held[1]}; the "
                                     f"model has KV heads {want[0]}, head_dim {want[1]}: {REUSE}")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        self._check_update(key_states, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_update(self, key_states: torch.Tensor, layer_idx: int) -> None:
        """Refuse keys that do not fit what this cache holds: another layer count, batch, KV heads, head_dim, dtype
        or device (a model that did not fill it)."""
        if layer_idx >= len(self.layers):
            plan = self._paging.last_plan  # a config-less cache grows layers during its first forward only
            first_forward = not self._filled() or (plan is not None and plan[0].from_len == 0)
            if self.layer_class_to_replicate is None or not first_forward:
                raise ValueError(f"the model updates layer {layer_idx} but this KVarNCache holds {len(self.layers)} "
                                 f"layers: {REUSE}")
            return
        layer = self.layers[layer_idx]
        if isinstance(layer, KVarNLayer) and layer.is_initialized:
            held = (self._paging.batch, layer.pool_k.shape[1], layer.pool_k.shape[3], layer.dtype, layer.device)
        elif not isinstance(layer, KVarNLayer) and layer.is_initialized and layer.keys.dim() == 4:
            held = (*layer.keys.shape[:2], layer.keys.shape[3], layer.keys.dtype, layer.keys.device)
        else:
            return
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[-1], key_states.dtype, key_states.device)
        if got != held:

            def say(x: tuple) -> str:
                return f"batch {x[0]}, KV heads {x[1]}, head_dim {x[2]}, {str(x[3]).removeprefix('torch.')}, {x[4]}"

            raise ValueError(f"layer {layer_idx} of this KVarNCache holds {say(held)}; the model gives {say(got)}: "
                             f"{REUSE}")

    @property
    def batch_size(self) -> int:
        """Rows held, or -1 before the first forward (transformers' convention for an empty cache)."""
        return self._paging.batch if self._paging.device is not None else -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decoder"] = None  # CUDA graphs of this process's model: a copy or a loaded cache captures its own
        return state

    # --- whole-cache edits (the shared paging first, then every layer) ----------------------------------
    def reset(self) -> None:
        """Empty the cache, keeping its settings; the next model to run adopts it as a new cache."""
        self._config_id = None
        self._paging.reset()
        self._decoder = None
        self._graphs_off = False
        for layer in self.layers:
            layer.reset()

    # --- CUDA-graph decode (graphs.py) -------------------------------------------------------------------
    def wants_decode_graphs(self, model: Any) -> bool:
        """Whether `generate()` should run this cache's decode steps through `graphs.DecodeGraphs`: fused mode and
        decode_graphs=True, or decode_graphs=None (the default) on a CUDA model."""
        if not is_fused(model.config) or self.decode_graphs is False or self._graphs_off:
            return False
        return self.decode_graphs is True or getattr(model, "device", torch.device("cpu")).type == "cuda"

    def decode_graphs_for(self, model: Any) -> Any:
        """The `graphs.DecodeGraphs` runner of `model` over this cache (made once per model)."""
        if self._decoder is None or self._decoder._model() is not model:
            self._decoder = DecodeGraphs(model, self)
        return self._decoder

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx.to("cpu", torch.long), lambda layer: layer.reorder_cache(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows = torch.as_tensor(indices, device="cpu")
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long().flatten()
        self._select_rows(rows, lambda layer: layer.batch_select_indices(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self._paging.batch).repeat_interleave(repeats)
        self._select_rows(rows, lambda layer: layer.batch_repeat_interleave(repeats))

    def _select_rows(self, rows: torch.Tensor, other: Any) -> None:
        rows_dev = self._paging.select(rows) if self._paging.device is not None else None
        if rows_dev is not None:  # beam search reorders every step: capturing graphs would not pay
            self._graphs_off = True
            self._decoder = None
        for layer in self.layers:
            if isinstance(layer, KVarNLayer):
                if rows_dev is not None:
                    layer._select(rows_dev)
            else:
                other(layer)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative count, as transformers >= 5.18 requires).

        Exact inside the 16-bit sink and tail, down to any tile boundary, inside each row's newest quantized tile with
        keep_last_tile, and inside every tile completed by the latest forward past the prompt after
        `bind(verify_from=...)` (assisted decoding); a crop deeper into quantized history raises ValueError.
        """
        tokens_to_remove = int(tokens_to_remove)  # transformers 5.17 passes a 0-d tensor
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative count of tokens to remove (the positive 'max length' "
                "form is deprecated in transformers)"
            )
        remove = min(-tokens_to_remove, self._paging.length)
        restore = self._paging.crop(remove) if remove else None
        for layer in self.layers:
            if isinstance(layer, KVarNLayer):
                if restore is not None:
                    layer._crop(remove, *restore)
            else:
                layer.crop(tokens_to_remove)

    # --- the model's attention mask -----------------------------------------------------------------------
    def verification_mask(self, config: Any, inputs_embeds: torch.Tensor, layer_idx: int) -> torch.Tensor | None:
        """The attention mask of a dense-path verification forward (inputs [B, T, hidden]) over the KVarN layers, or
        None when the model's own causal mask is right (see verify.py; register.py hands it to the model)."""
        paging, (batch, query_length) = self._paging, inputs_embeds.shape[:2]
        if (paging.fused or paging.verify_from is None or query_length <= 1 or layer_idx >= len(self.layers)
                or not isinstance(self.layers[layer_idx], KVarNLayer)):
            return None
        pads = paging.pads if paging.pads is not None else torch.zeros(batch, dtype=torch.long)
        parts = verify.chunks(pads.tolist(), paging.length, query_length, paging.group, paging.verify_from)
        mask = verify.dense_mask(pads, paging.length, parts, paging.group) if len(parts) > 1 else None
        if mask is None:
            return None
        implementation = getattr(config, "_attn_implementation", None)
        if implementation == "sdpa":
            return mask.to(inputs_embeds.device)
        if implementation == "eager":
            dtype = inputs_embeds.dtype
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
            return mask.to(inputs_embeds.device)
        raise ValueError(
            f"speculative decoding with KVarNCache needs attn_implementation 'kvarn', 'sdpa' or 'eager' (the mask "
            f"that gives each verified token its one-token-decoding history), not {implementation!r}"
        )

    # --- sizes ---------------------------------------------------------------------------------------------
    def reserve(self, max_length: int) -> None:
        """Pre-size tile storage for rows of up to `max_length` positions (generate() does this itself)."""
        self._paging.reserve(max_length)
        for layer in self.layers:
            if isinstance(layer, KVarNLayer) and layer.is_initialized:
                layer._grow()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by all layers: KVarN tiles (used / allocated), 16-bit blocks, and sliding-window layers."""
        total = {"tiles_used": 0, "tiles_allocated": 0, "dense": 0, "sliding": 0}
        for layer in self.layers:
            if isinstance(layer, KVarNLayer):
                for key, value in layer.memory_bytes().items():
                    total[key] += value
            elif layer.is_initialized and layer.keys is not None:
                total["sliding"] += 2 * layer.keys.numel() * layer.keys.element_size()
        return total

