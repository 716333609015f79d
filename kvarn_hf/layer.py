"""KVarNLayer: one full-attention layer's storage (KVarN tiles in a paged uint8 cache, 16-bit sink and tail blocks)
and its two ways of serving attention: dense tensors (`update`) or fused attention from the packed tiles (`attend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvarn_kernels import DEFAULT_PRESET, KVarNFormat, PagedKV, ops
from kvarn_kernels.codec import dequantize_tiles

from . import verify
from .paging import Paging
from .placement import Step

# Fused prefills without history or padding go through torch's SDPA (flash on a GPU); False forces the paged kernel.
PREFILL_SDPA = True


@dataclass
class PendingKV:
    """New keys/values [B, H, T, D] handed to attention in fused mode; the layer appends them after attending."""

    layer: KVarNLayer
    keys: torch.Tensor
    values: torch.Tensor


class KVarNLayer(CacheLayerMixin):
    """One full-attention layer: KVarN tiles in a paged uint8 cache plus 16-bit sink and tail blocks per row.

    Batch edits (reorder, select, repeat, crop, reset) go through `KVarNCache`, which updates the shared paging
    metadata once and then each layer's data.
    """

    is_compileable = False
    is_sliding = False

    @property
    def is_croppable(self) -> bool:
        """Whether undoing the latest forward is exact (it may reopen tiles, which needs their 16-bit copies)."""
        return self.paging.croppable

    def __init__(self, paging: Paging, preset: str = DEFAULT_PRESET) -> None:
        super().__init__()
        self.paging = paging
        self.preset = preset
        self._drop()

    def _drop(self) -> None:
        self.fmt: KVarNFormat | None = None
        self.tiles: torch.Tensor | None = None  # uint8 [capacity, H, record_bytes]
        self.pool_k: torch.Tensor | None = None  # [2B, H, G, D]: block 2b is row b's sink, 2b + 1 its tail
        self.pool_v: torch.Tensor | None = None
        # [B, S, H, G, D]: 16-bit copies of tiles that a crop may reopen (Paging.shadow_lo/hi say which)
        self.shadow_k: torch.Tensor | None = None
        self.shadow_v: torch.Tensor | None = None
        # k_frame="sink-queries": float32 [2B, H, G, D], the squared query (mean over the KV head's query heads) of
        # each position, laid out like pool_k; row b's sink positions (block 2b) weight its K-frame choices.
        self.query_energy: torch.Tensor | None = None
        self.length = 0
        self.pending: PendingKV | None = None
        self.keys = self.values = None
        self.is_initialized = False

    # --- the transformers layer API ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                "KVarNCache needs keys and values of one shape [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        batch, heads, _, head_dim = key_states.shape
        try:
            self.fmt = KVarNFormat.from_preset(self.preset, head_dim, key_states.dtype)
        except ValueError as e:
            raise ValueError(f"KVarNCache cannot serve this model: {e}") from None
        self.dtype, self.device = key_states.dtype, key_states.device
        self.paging.start(batch, self.device)
        self.tiles = self.fmt.allocate(max(self.paging.capacity, 1), heads, self.device)
        self.pool_k = key_states.new_zeros(2 * batch, heads, self.fmt.group, head_dim)
        self.pool_v = torch.zeros_like(self.pool_k)
        if self.paging.k_frame == "sink-queries":
            self.query_energy = torch.zeros_like(self.pool_k, dtype=torch.float32)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "KVarNCache is in fused mode (model config attn_implementation='kvarn') but the previous tokens "
                "of this layer never reached the 'kvarn' attention function: load the model with "
                "attn_implementation='kvarn', or build the cache with that model's config"
            )
        if key_states.shape[0] != self.paging.batch:
            raise ValueError(f"got a batch of {key_states.shape[0]} rows but the cache holds {self.paging.batch}")
        if self.paging.fused:
            self.pending = PendingKV(self, key_states, value_states)
            return self.pending, self.pending
        if self.paging.k_frame == "sink-queries":
            raise ValueError(
                "KVarNCache(k_frame='sink-queries') weighs each K tile's frame choice by the sink's queries, which "
                "only the fused path sees: load the model with attn_implementation='kvarn', or use k_frame='range'"
            )
        steps = self._steps(key_states.shape[2], None)
        hist_k, hist_v = self._history(steps[0])
        start = 0
        for step in steps:
            self._append(step, key_states[:, :, start : start + step.num_new],
                         value_states[:, :, start : start + step.num_new])
            start += step.num_new
        if len(steps) > 1:  # a verification forward: the tiles it completed, for the mask of verify.dense_mask
            more_k, more_v = self._completed_tiles(steps)
            hist_k, hist_v = torch.cat([hist_k, more_k], dim=2), torch.cat([hist_v, more_v], dim=2)
        return torch.cat([hist_k, key_states], dim=2), torch.cat([hist_v, value_states], dim=2)

    def attend(
        self, query: torch.Tensor, pending: PendingKV, scaling: float | None, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """Fused attention of query [B, Hq, T, D] over this layer's history and `pending`; returns [B, T, Hq, D]."""
        if pending is not self.pending:
            raise RuntimeError("this PendingKV does not belong to the layer's latest update")
        self.pending = None
        steps = self._steps(query.shape[2], padding)
        if len(steps) == 1:
            return self._attend_step(steps[0], query, pending.keys, pending.values, scaling)
        # A verification forward: its parts attend one after the other, each over the tiles the previous completed.
        outs, start = [], 0
        for step in steps:
            part = slice(start, start + step.num_new)
            outs.append(self._attend_step(step, query[:, :, part], pending.keys[:, :, part],
                                          pending.values[:, :, part], scaling))
            start += step.num_new
        return torch.cat(outs, dim=1)

    def _attend_step(
        self, step: Step, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        batch, heads_q, num_new, d = query.shape
        if self.query_energy is not None and step.num_dense:
            self._record_query_energy(step, query)
        if PREFILL_SDPA and step.real_index is None and not any(step.real_before):
            # A prefill (no row has history, none is padded) attends only to its own 16-bit tokens: plain causal
            # attention, which torch's flash SDPA does faster than the paged kernel's 16-bit path.
            out = torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
            self._append(step, keys, values)
            return out.transpose(1, 2)
        q = query.transpose(1, 2).reshape(batch * num_new, heads_q, d)
        k = keys.transpose(1, 2).reshape(batch * num_new, -1, d)
        v = values.transpose(1, 2).reshape(batch * num_new, -1, d)
        if step.real_index is not None:
            q, k, v = q[step.real_index], k[step.real_index], v[step.real_index]
        if step.max_new:
            state = self._state(step.seq_lens_before)
            out = ops.paged_attention(
                q.contiguous(), state, step.cu_seqlens, step.max_new, k.contiguous(), v.contiguous(), step.cu_seqlens,
                scaling, max_history=step.history_bound or max(step.real_before, default=0),
            )
        else:
            out = q.new_zeros(q.shape)
        if step.real_index is not None:
            out = q.new_zeros(batch * num_new, heads_q, d).index_copy_(0, step.real_index, out)
        self._append(step, keys, values)
        return out.view(batch, num_new, heads_q, d)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length + (self.pending.keys.shape[2] if self.pending is not None else 0)

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        raise NotImplementedError("KVarNCache does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("KVarNCache does not support offloading")

    def reset(self) -> None:
        self._drop()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("reorder a KVarNCache as a whole (KVarNCache.reorder_cache), not layer by layer")

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("crop a KVarNCache as a whole (KVarNCache.crop), not layer by layer")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("edit a KVarNCache's batch as a whole (KVarNCache.batch_repeat_interleave)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise RuntimeError("edit a KVarNCache's batch as a whole (KVarNCache.batch_select_indices)")

    def paged_state(self) -> PagedKV:
        """The kernel-core view (`PagedKV`) of this layer's stored history."""
        if not self.is_initialized or self.pending is not None:
            raise RuntimeError("the layer holds no completed history yet")
        return self._state(self.paging.seq_lens)

    # --- internals ----------------------------------------------------------------------------------------
    def _state(self, seq_lens: torch.Tensor) -> PagedKV:
        return PagedKV(
            fmt=self.fmt, cache=self.tiles, block_table=self.paging.block_table, seq_lens=seq_lens,
            sink_k=self.pool_k, sink_v=self.pool_v, tail_k=self.pool_k, tail_v=self.pool_v,
            dense_table=self.paging.dense_table,
        )

    def _steps(self, num_new: int, padding: torch.Tensor | None) -> list[Step]:
        """The shared steps of a forward from this layer's length: planned by the first layer to get there, reused
        by the rest."""
        paging, last = self.paging, self.paging.last_plan
        static = paging.static_step
        if static is not None and static.from_len == self.length and num_new == 1:
            return [static]
        if paging.length == self.length:
            return paging.plan(self.length, num_new, padding)
        if last and last[0].from_len == self.length and sum(step.num_new for step in last) == num_new:
            return last
        raise RuntimeError(
            f"KVarNCache layers are out of step: this layer holds {self.length} positions, the cache "
            f"{paging.length}; every layer must see the same updates"
        )

    def _record_query_energy(self, step: Step, query: torch.Tensor) -> None:
        """Store each new position's squared query, [B, Hq, T, D] pooled over the query heads of a KV head, where
        the position's key goes (sink or tail block): the sink's part weighs the K-frame choice of this row's
        tiles (`reference.sink_query_weights`)."""
        batch, heads_q, num_new, d = query.shape
        heads = self.pool_k.shape[1]
        energy = query.detach().float().square().view(batch, heads, heads_q // heads, num_new, d).mean(2)  # B,H,T,D
        row, t, blk, slot = step.dense
        self.query_energy[blk, :, slot] = energy.transpose(1, 2)[row, t]

    def _k_weights(self, step: Step) -> torch.Tensor | None:
        """Channel weights [n_tiles, H, D] of the step's tiles: the mean squared query over their row's sink (full:
        a row completes a tile only from 2G tokens on). None with k_frame='range'."""
        if self.query_energy is None:
            return None
        return self.query_energy[2 * step.tile_rows].mean(2).contiguous()

    def _append(self, step: Step, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the step's new tokens [B, H, T, D] into sink/tail blocks and quantize the tiles they complete."""
        # The cache stores values, not autograd history (the tiles have none anyway): a stored tensor that required
        # grad could not be written in place once saved and loaded again.
        keys, values = keys.detach(), values.detach()
        kb, vb = keys.transpose(1, 2), values.transpose(1, 2)  # [B, T, H, D] views
        if step.num_tiles:
            g, heads, d = self.fmt.group, keys.shape[1], keys.shape[3]
            stage_k = keys.new_empty(step.num_tiles * g, heads, d)
            stage_v = torch.empty_like(stage_k)
            if step.num_move:  # before the tail blocks are overwritten below
                blk, slot, flat = step.move
                stage_k[flat] = self.pool_k[blk, :, slot]
                stage_v[flat] = self.pool_v[blk, :, slot]
            row, t, flat = step.stage
            stage_k[flat] = kb[row, t]
            stage_v[flat] = vb[row, t]
        if step.num_dense:
            row, t, blk, slot = step.dense
            self.pool_k[blk, :, slot] = kb[row, t]
            self.pool_v[blk, :, slot] = vb[row, t]
        if step.num_tiles:
            self._grow()
            ops.quantize_into_cache(stage_k, stage_v, step.tile_starts, step.tile_blocks, self.tiles, self.fmt,
                                    self._k_weights(step))
            if step.num_shadow:
                self._keep_shadow(step, stage_k, stage_v)
        self.length += step.num_new

    def _grow(self) -> None:
        capacity = self.paging.capacity
        if self.tiles.shape[0] < capacity:
            grown = self.fmt.allocate(capacity, self.tiles.shape[1], self.device)
            grown[: self.tiles.shape[0]] = self.tiles
            self.tiles = grown

    def _keep_shadow(self, step: Step, stage_k: torch.Tensor, stage_v: torch.Tensor) -> None:
        """Keep 16-bit copies of the step's tiles that a crop may reopen (chosen by `Paging.plan`)."""
        slots = self.paging.shadow_slots
        if self.shadow_k is None or self.shadow_k.shape[1] < slots:
            grown = self.pool_k.new_zeros(self.paging.batch, slots, *self.pool_k.shape[1:])
            grown_v = torch.zeros_like(grown)
            if self.shadow_k is not None:  # rows that completed no tile in this forward keep their copies
                grown[:, : self.shadow_k.shape[1]] = self.shadow_k
                grown_v[:, : self.shadow_v.shape[1]] = self.shadow_v
            self.shadow_k, self.shadow_v = grown, grown_v
        rows, tiles, where = step.shadow
        g = self.fmt.group
        self.shadow_k[rows, where] = stage_k.view(-1, g, *stage_k.shape[1:])[tiles].transpose(1, 2)
        self.shadow_v[rows, where] = stage_v.view(-1, g, *stage_v.shape[1:])[tiles].transpose(1, 2)

    def _completed_tiles(self, steps: list[Step]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiles that a verification forward completed before its last part, dequantized, as [B, H, X, D]:
        slot j of row b holds its tile `first + j` (the layout `verify.dense_mask` expects)."""
        g = self.fmt.group
        first = verify.tiles_of(torch.tensor(steps[0].real_before), g)
        count = verify.tiles_of(torch.tensor(steps[-1].real_before), g) - first
        batch, heads, _, d = self.pool_k.shape[0] // 2, *self.pool_k.shape[1:]
        out_k = self.pool_k.new_zeros(batch, heads, g * int(count.max()), d)
        out_v = torch.zeros_like(out_k)
        if out_k.shape[2]:
            rows = torch.repeat_interleave(torch.arange(batch), count)
            index = torch.arange(int(count.sum())) - torch.repeat_interleave(count.cumsum(0) - count, count)
            blocks = self.paging.host_table[rows, first[rows] + index]
            k_t, v_t = dequantize_tiles(self.tiles[blocks.to(self.device)], self.fmt)  # [n, H, G, D] float32
            rows, index = rows.to(self.device), index.to(self.device)
            for out, tiles in ((out_k, k_t), (out_v, v_t)):
                view = out.view(batch, heads, -1, g, d).transpose(1, 2)  # [B, X / G, H, G, D]
                view[rows, index] = tiles.to(out.dtype)
        return out_k, out_v

    def _history(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The history before `step` as dense [B, H, from_len, D] in the padded frame (padding left as zeros)."""
        batch = self.paging.batch
        g = self.fmt.group
        n = step.from_len
        hist_k = self.pool_k.new_zeros(batch, self.pool_k.shape[1], n, self.pool_k.shape[3])
        hist_v = torch.zeros_like(hist_k)
        tiles = [max(length - g, 0) // g for length in step.real_before]
        most = max(tiles, default=0)
        if most:
            # Columns past a row's own tile count may already name tiles of this step (allocated by another layer
            # first, maybe beyond this layer's storage): read block 0 there instead, the result is never used.
            valid = torch.arange(most)[None, :] < torch.tensor(tiles)[:, None]
            blocks = self.paging.block_table[:, :most].long() * valid.to(self.device)
            k_t, v_t = dequantize_tiles(self.tiles[blocks.flatten()], self.fmt)  # [B * most, H, G, D] float32

            def rows(x: torch.Tensor) -> torch.Tensor:
                return x.view(batch, most, x.shape[1], g, -1).transpose(1, 2).flatten(2, 3).to(hist_k.dtype)

            k_t, v_t = rows(k_t), rows(v_t)
        for b, length in enumerate(step.real_before):
            start, sink = n - length, min(length, g)
            quant = tiles[b] * g
            tail = length - sink - quant
            for hist, pool, quantized in ((hist_k, self.pool_k, k_t if most else None),
                                          (hist_v, self.pool_v, v_t if most else None)):
                hist[b, :, start : start + sink] = pool[2 * b, :, :sink]
                if quant:
                    hist[b, :, start + g : start + g + quant] = quantized[b, :, :quant]
                if tail:
                    hist[b, :, n - tail :] = pool[2 * b + 1, :, :tail]
        return hist_k, hist_v

    def _select(self, rows: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows (device int64 indices)."""
        if not self.is_initialized:
            return
        shape = self.pool_k.shape
        self.pool_k = self.pool_k.view(-1, 2, *shape[1:]).index_select(0, rows).flatten(0, 1)
        self.pool_v = self.pool_v.view(-1, 2, *shape[1:]).index_select(0, rows).flatten(0, 1)
        if self.query_energy is not None:
            self.query_energy = self.query_energy.view(-1, 2, *shape[1:]).index_select(0, rows).flatten(0, 1)
        if self.shadow_k is not None:
            self.shadow_k = self.shadow_k.index_select(0, rows)
            self.shadow_v = self.shadow_v.index_select(0, rows)

    def _crop(self, remove: int, rows: torch.Tensor, slots: torch.Tensor) -> None:
        if rows.numel():
            self.pool_k[2 * rows + 1] = self.shadow_k[rows, slots]
            self.pool_v[2 * rows + 1] = self.shadow_v[rows, slots]
        self.length -= remove

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: used tiles, allocated tiles, and the 16-bit sink/tail/shadow blocks."""
        if not self.is_initialized:
            return {"tiles_used": 0, "tiles_allocated": 0, "dense": 0}
        held = (self.pool_k, self.pool_v, self.shadow_k, self.shadow_v, self.query_energy)
        dense = sum(t.numel() * t.element_size() for t in held if t is not None)
        per_block = self.tiles.shape[1] * self.tiles.shape[2]
        used = self.paging.next_block - len(self.paging.free_blocks)
        return {"tiles_used": used * per_block, "tiles_allocated": self.tiles.numel(),
                "dense": dense}

