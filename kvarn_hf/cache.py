"""KVarNCache: a transformers Cache whose full-attention layers keep KVarN tiles plus a 16-bit sink and tail.

Layout, per batch row and full-attention layer (the kernel core's `PagedKV`): the row's first G real tokens stay
16-bit for its whole life (the sink), every later full tile of G tokens is quantized once, when it fills, into a
growable paged uint8 cache, and the newest partial tile stays 16-bit (the tail). Tiles are append-only: history is
never re-quantized.

Left padding: each row's tokens are counted from its first real token, so the sink starts there and padded
positions never enter a tile's statistics. The cache learns the padding from the 2-D attention mask: `generate()`
hands it over before the prefill (see `register.py`), the fused attention path reads it from its mask, and manual
loops with the dense path call `KVarNCache.set_padding`. Rows may therefore fill their tiles at different steps.

Two modes, picked from the model's attention implementation:
- fused (attn_implementation="kvarn"): `update()` returns a `PendingKV` handle; the registered attention function
  calls `KVarNLayer.attend`, which attends over packed tiles + 16-bit sink/tail + the new tokens through
  `kvarn_kernels.ops.paged_attention`, then appends the new tokens.
- dense (eager, sdpa, ...): `update()` returns the dequantized history followed by the new 16-bit tokens, in the
  padded frame the model's own mask expects, like the stock QuantizedCache.
In both modes a forward pass sees the history as stored before it and its own new tokens in 16-bit.

Sliding-window layers (Gemma-3's local layers) keep transformers' 16-bit rolling window (`DynamicSlidingWindowLayer`):
their window is short and rolls, which does not fit append-only tiles; only full-attention layers are quantized.

All KVarN layers of one cache see the same tokens, so their paging metadata (block table, lengths, padding) is one
shared `_Paging` object: the first layer to reach a forward step computes where its tokens go and advances it, the
other layers replay that step; batch edits and crops update it once, from `KVarNCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvarn_kernels import DEFAULT_PRESET, PRESETS, KVarNFormat, PagedKV, ops
from kvarn_kernels.codec import dequantize_tiles

__all__ = ["KVarNCache", "KVarNLayer", "PendingKV"]

# How KVarNCache chooses each K tile's frame (see KVarNCache).
K_FRAME_RULES = ("range", "sink-queries")
# Fused prefills without history or padding go through torch's SDPA (flash on a GPU); False forces the paged kernel.
PREFILL_SDPA = True

@dataclass
class PendingKV:
    """New keys/values [B, H, T, D] handed to attention in fused mode; the layer appends them after attending."""

    layer: KVarNLayer
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class _Step:
    """Where the T new positions of one forward go, for every row (shared by all KVarN layers)."""

    from_len: int
    num_new: int
    real_before: list[int]  # real tokens per row before the step
    seq_lens_before: torch.Tensor  # int32 [B] on the device
    cu_seqlens: torch.Tensor  # int32 [B + 1]: real new tokens per row, cumulated
    max_new: int
    real_index: torch.Tensor | None  # flat (b * T + t) indices of real new positions, None when all are real
    dense: tuple[torch.Tensor, ...]  # (row, t, pool block, slot): new tokens that go to a sink or tail block
    stage: tuple[torch.Tensor, ...]  # (row, t, flat staging index): new tokens that complete tiles
    move: tuple[torch.Tensor, ...]  # (pool block, slot, flat staging index): old tail tokens of completed tiles
    tile_starts: torch.Tensor  # int32 [n_tiles]
    tile_blocks: torch.Tensor  # int32 [n_tiles]
    tile_rows: torch.Tensor  # int64 [n_tiles]: the row each tile belongs to
    shadow: tuple[torch.Tensor, torch.Tensor]  # (row, staging tile): the newest completed tile of each row
    num_tiles: int
    num_dense: int
    num_move: int
    history_bound: int | None = None  # bounds every row's history for the kernel's grid; None: max(real_before)


class _Paging:
    """Paging metadata shared by the KVarN layers of one cache: per-row padding, lengths and block table."""

    def __init__(self, group: int, keep_last_tile: bool, k_frame: str = "range") -> None:
        self.group = group
        self.fused = False
        self.keep_last_tile = keep_last_tile
        self.k_frame = k_frame
        self.reserved_tokens = 0
        self._clear()

    def _clear(self) -> None:
        self.batch = 0
        self.device: torch.device | None = None
        self.pads: torch.Tensor | None = None  # int64 [B] on the host: leading padded positions per row
        self.length = 0  # positions seen, padding included (the same for every row)
        self.next_block = 0
        self.capacity = 0  # physical blocks each layer's tile cache must hold
        self.block_table: torch.Tensor | None = None
        self.seq_lens: torch.Tensor | None = None
        self.dense_table: torch.Tensor | None = None
        self.shadow_tile = torch.zeros(0, dtype=torch.long)  # per row: tile held in 16-bit by the shadow, or -1
        self.last_step: _Step | None = None  # the latest step, replayed by the layers that reach it later
        self.static: _StaticDecode | None = None  # device buffers of CUDA-graph decode steps (graphs.py)
        self.static_step: _Step | None = None  # the static decode step in progress, if any

    def start(self, batch: int, device: torch.device) -> None:
        if self.device is None:
            if self.pads is not None and self.pads.shape[0] != batch:
                raise ValueError(f"the padding mask has {self.pads.shape[0]} rows but the batch has {batch}")
            self.batch, self.device = batch, device
            self.block_table = torch.zeros(batch, 0, dtype=torch.int32, device=device)
            self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
            self.dense_table = _dense_table(batch, device)
            self.shadow_tile = torch.full((batch,), -1, dtype=torch.long)
            self.reserve(self.reserved_tokens)
        elif (batch, device) != (self.batch, self.device):
            raise ValueError(
                f"KVarNCache holds batch {self.batch} on {self.device} but got a batch of {batch} on {device}: "
                "all layers must be on one device, and the batch changes only through reorder/select/repeat"
            )

    def reserve(self, max_tokens: int) -> None:
        """Size the block table and tile caches for rows of up to `max_tokens` positions (avoids regrowth)."""
        self.reserved_tokens = max(self.reserved_tokens, max_tokens)
        if self.device is None:
            return
        tiles = max(self.reserved_tokens - self.group, 0) // self.group
        self._widen(tiles)
        pads = self.pads if self.pads is not None else torch.zeros(self.batch, dtype=torch.long)
        have = ((self.length - pads).clamp_min(0) - self.group).clamp_min(0) // self.group
        self.capacity = max(self.capacity, self.next_block + int((tiles - have).clamp_min(0).sum()))

    def set_pads(self, attention_mask: torch.Tensor | None) -> None:
        """Learn (or check) each row's leading padding from a 2-D mask [B, >= length]; None means no padding."""
        if attention_mask is None:
            if self.device is None:
                return
            pads = torch.zeros(self.batch, dtype=torch.long)
        else:
            mask = attention_mask.detach().to("cpu", torch.bool)
            if mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D [batch, positions], got shape {tuple(mask.shape)}")
            pads = (mask.cumsum(-1) == 0).sum(-1)
            after = torch.arange(mask.shape[1])[None, :] >= pads[:, None]
            if not bool(mask[after].all()):
                raise ValueError(
                    "attention_mask has padding after a row's first real token: KVarNCache supports left padding "
                    "only (tokenizer padding_side='left')"
                )
        if self.device is not None and pads.shape[0] != self.batch:
            raise ValueError(f"attention_mask has {pads.shape[0]} rows but the cache holds a batch of {self.batch}")
        if self.pads is None:
            self.pads = pads
        elif not torch.equal(pads, self.pads):
            raise ValueError(
                f"attention_mask pads rows by {pads.tolist()} but the cache was filled with padding "
                f"{self.pads.tolist()}: continue a cached batch with the mask it was started with"
            )

    def real_lengths(self, length: int) -> torch.Tensor:
        return (length - self.pads).clamp_min(0)

    # --- one forward step ---------------------------------------------------------------------------------
    def step(self, from_len: int, num_new: int, padding: torch.Tensor | None) -> _Step:
        """Advance by `num_new` positions: place every new token and allocate the tiles they complete."""
        if self.pads is None:
            self.set_pads(padding)
        fast = _decode_placement(self.pads.tolist(), from_len, self.group) if num_new == 1 else None
        parts, new_tiles, nq1 = fast or _placement(self.pads, from_len, num_new, self.group, self.next_block)
        batch, num_tiles = self.batch, int(new_tiles.sum())
        l0 = self.real_lengths(from_len)
        n_real = parts["seq_lens"] - l0
        dev = _to_device(parts, self.device)
        seq_lens_before = self.seq_lens
        self._widen(int(nq1.max()) if batch else 0)
        self.next_block += num_tiles
        if self.next_block > self.capacity:  # grow geometrically: each growth copies every layer's tiles
            self.capacity = max(self.next_block, math.ceil(self.capacity * 1.5))
        if num_tiles:
            self.block_table[dev["tile_rows"], dev["tile_cols"]] = dev["tile_blocks"].to(torch.int32)
        self.seq_lens = dev["seq_lens"].to(torch.int32)
        self.length = from_len + num_new
        if self.keep_last_tile:
            self.shadow_tile = torch.where(new_tiles > 0, nq1 - 1, self.shadow_tile)
        self.last_step = _Step(
            from_len=from_len,
            num_new=num_new,
            real_before=l0.tolist(),
            seq_lens_before=seq_lens_before,
            cu_seqlens=dev["cu"].to(torch.int32),
            max_new=int(n_real.max()) if batch else 0,
            real_index=dev.get("real_index"),
            dense=(dev["dense_row"], dev["dense_t"], dev["dense_blk"], dev["dense_slot"]),
            stage=(dev["stage_row"], dev["stage_t"], dev["stage_flat"]),
            move=(dev["move_blk"], dev["move_slot"], dev["move_flat"]),
            tile_starts=dev["tile_starts"].to(torch.int32),
            tile_blocks=dev["tile_blocks"].to(torch.int32),
            tile_rows=dev["tile_rows"],
            shadow=(dev["shadow_row"], dev["shadow_tile"]),
            num_tiles=num_tiles,
            num_dense=parts["dense_row"].numel(),
            num_move=parts["move_blk"].numel(),
        )
        return self.last_step

    def begin_static_step(self, history_bound: int) -> _Step | None:
        """Advance by one decode token per row through the static device buffers of `self.static` (which a
        captured CUDA graph reads), or return None when the step is not a plain decode step: a row completes a
        tile (the quantize launch and the block-table update run eagerly) or has no real token yet.

        The returned step is what every layer uses until `end_static_step`; history_bound must be at least every
        row's history (it sizes the kernel's split grid, fixed in a graph)."""
        if self.device is None or self.pads is None:
            return None
        fast = _decode_placement(self.pads.tolist(), self.length, self.group)
        if fast is None:
            return None
        parts, _, _ = fast
        if self.static is None:
            self.static = _StaticDecode(self.batch, self.device)
        before = self.real_lengths(self.length)
        self.static.load(parts["dense_blk"], parts["dense_slot"], before, parts["seq_lens"])
        step = self.static.step(self.length, before.tolist(), history_bound)
        self.seq_lens = self.static.meta[3]  # the lengths after the step
        self.length += 1
        self.last_step = None
        self.static_step = step
        return step

    def end_static_step(self) -> None:
        self.static_step = None

    def _widen(self, tiles: int) -> None:
        have = self.block_table.shape[1]
        if tiles > have:
            pad = torch.zeros(self.batch, tiles - have, dtype=torch.int32, device=self.device)
            self.block_table = torch.cat([self.block_table, pad], dim=1)

    # --- batch and length edits ---------------------------------------------------------------------------
    def crop(self, remove: int) -> torch.Tensor:
        """Drop the last `remove` positions; returns the rows whose tail must be restored from the shadow."""
        g = self.group
        new_len = self.length - remove
        l_old, l_new = self.real_lengths(self.length), self.real_lengths(new_len)
        nq_old, nq_new = (l_old - g).clamp_min(0) // g, (l_new - g).clamp_min(0) // g
        tail_new = (l_new - g).clamp_min(0) % g
        restore = (nq_new < nq_old) & (tail_new > 0)
        bad = restore & (self.shadow_tile != nq_new)
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"crop(-{remove}) would cut into quantized tile {int(nq_new[b])} of row {b}, which no longer has a "
                "16-bit copy: KVarNCache can undo tokens in the 16-bit sink and tail, and in each row's newest "
                "quantized tile when built with keep_last_tile=True (assisted generate() does this), not older history"
            )
        self.length = new_len
        self.last_step = None
        self.seq_lens = l_new.to(torch.int32).to(self.device)
        self.shadow_tile = torch.where(self.shadow_tile >= nq_new, -1, self.shadow_tile)  # reopened or dropped
        return torch.nonzero(restore).flatten().to(self.device)

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep/reorder/repeat batch rows (host int64 indices); returns the indices on the device."""
        rows_dev = rows.to(self.device)
        self.pads = self.pads[rows] if self.pads is not None else None
        self.batch = rows.numel()
        self.block_table = self.block_table.index_select(0, rows_dev)
        self.seq_lens = self.seq_lens.index_select(0, rows_dev)
        self.dense_table = _dense_table(self.batch, self.device)
        self.shadow_tile = self.shadow_tile[rows]
        self.last_step = None
        self.static = None
        return rows_dev

    def reset(self) -> None:
        self._clear()


def _placement(
    pads: torch.Tensor, from_len: int, num_new: int, g: int, next_block: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Host-side index tensors saying where each of `num_new` new positions goes, for rows padded by `pads`.

    Returns (index tensors by name, tiles completed per row, full tiles per row after the step).
    """
    batch = pads.shape[0]
    t = torch.arange(num_new)
    rows = torch.arange(batch)[:, None].expand(batch, num_new)
    idx = from_len + t[None, :] - pads[:, None]  # [B, T] real-token index of each new position
    real = idx >= 0
    l0, l1 = (from_len - pads).clamp_min(0), (from_len + num_new - pads).clamp_min(0)
    nq0, nq1 = (l0 - g).clamp_min(0) // g, (l1 - g).clamp_min(0) // g
    tail0 = (l0 - g).clamp_min(0) % g
    new_tiles = nq1 - nq0
    base = new_tiles.cumsum(0) - new_tiles  # first staging tile of each row
    in_sink = real & (idx < g)
    tile = torch.div(idx - g, g, rounding_mode="floor")
    slot = (idx - g) - tile * g
    to_tile = real & ~in_sink & (tile < nq1[:, None])
    to_tail = real & ~in_sink & ~to_tile
    dense = in_sink | to_tail
    tt = t[None, :].expand(batch, num_new)
    dense_idx = (rows[dense], tt[dense], (2 * rows + to_tail.long())[dense], torch.where(in_sink, idx, slot)[dense])
    flat = (base[:, None] + tile - nq0[:, None]) * g + slot
    stage_idx = (rows[to_tile], tt[to_tile], flat[to_tile])
    s = torch.arange(g)[None, :].expand(batch, g)
    moving = (new_tiles > 0)[:, None] & (s < tail0[:, None])
    move_rows = torch.arange(batch)[:, None].expand(batch, g)[moving]
    move_idx = (2 * move_rows + 1, s[moving], (base[:, None] * g + s)[moving])
    num_tiles = int(new_tiles.sum())
    tile_rows = torch.repeat_interleave(torch.arange(batch), new_tiles)
    tile_cols = nq0[tile_rows] + torch.arange(num_tiles) - base[tile_rows]
    tile_blocks = next_block + torch.arange(num_tiles)
    shadow_rows = torch.nonzero(new_tiles > 0).flatten()
    shadow_idx = (shadow_rows, base[shadow_rows] + new_tiles[shadow_rows] - 1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), (l1 - l0).cumsum(0)])

    parts = {
        "dense_row": dense_idx[0], "dense_t": dense_idx[1], "dense_blk": dense_idx[2], "dense_slot": dense_idx[3],
        "stage_row": stage_idx[0], "stage_t": stage_idx[1], "stage_flat": stage_idx[2],
        "move_blk": move_idx[0], "move_slot": move_idx[1], "move_flat": move_idx[2],
        "tile_starts": torch.arange(num_tiles) * g, "tile_blocks": tile_blocks,
        "tile_rows": tile_rows, "tile_cols": tile_cols, "shadow_row": shadow_idx[0], "shadow_tile": shadow_idx[1],
        "cu": cu, "seq_lens": l1,
    }
    if not bool(real.all()):
        parts["real_index"] = torch.nonzero(real.flatten()).flatten()
    return parts, new_tiles, nq1


_PLACEMENT_KEYS = ("dense_row", "dense_t", "dense_blk", "dense_slot", "stage_row", "stage_t", "stage_flat", "move_blk",
                   "move_slot", "move_flat", "tile_starts", "tile_blocks", "tile_rows", "tile_cols", "shadow_row",
                   "shadow_tile", "cu", "seq_lens")


def _decode_placement(
    pads: list[int], from_len: int, g: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """`_placement` of one new position per row, from Python ints, for the common decode step: every row's token is
    real and none completes a tile (127 steps in 128), so each goes to its row's sink or tail block. None when
    that does not hold (the general `_placement` handles it). Saves ~85 small host tensor ops per step."""
    blocks, slots, after, full = [], [], [], []
    for b, pad in enumerate(pads):
        l0 = from_len - pad  # real tokens before the step = the new token's index
        if l0 < 0 or (l0 + 1 >= 2 * g and (l0 + 1) % g == 0):
            return None
        blocks.append(2 * b if l0 < g else 2 * b + 1)
        slots.append(l0 if l0 < g else (l0 - g) % g)
        after.append(l0 + 1)
        full.append(max(l0 + 1 - g, 0) // g)
    batch = len(pads)
    empty = torch.zeros(0, dtype=torch.long)
    parts = dict.fromkeys(_PLACEMENT_KEYS, empty)
    parts.update(dense_row=torch.arange(batch), dense_t=torch.zeros(batch, dtype=torch.long),
                 dense_blk=torch.tensor(blocks, dtype=torch.long), dense_slot=torch.tensor(slots, dtype=torch.long),
                 cu=torch.arange(batch + 1), seq_lens=torch.tensor(after, dtype=torch.long))
    return parts, torch.zeros(batch, dtype=torch.long), torch.tensor(full, dtype=torch.long)


class _StaticDecode:
    """Device buffers of a decode step (one token per row) that keep their storage from step to step, so that a
    captured CUDA graph reads each new step's values: where each row's token goes (pool block, slot) and the row's
    real length before and after the step, in one int32 [4, B] tensor loaded by one host-to-device copy."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.device = device
        self.meta = torch.zeros(4, batch, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)
        self.t0 = torch.zeros(batch, dtype=torch.long, device=device)
        self.cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.empty = torch.zeros(0, dtype=torch.long, device=device)

    def load(self, blocks: torch.Tensor, slots: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> None:
        host = torch.stack([blocks, slots, before, after]).to(torch.int32)
        if self.device.type == "cuda":  # the caching host allocator keeps the pinned copy alive until it is done
            host = host.pin_memory()
        self.meta.copy_(host, non_blocking=True)

    def step(self, from_len: int, real_before: list[int], history_bound: int) -> _Step:
        e, batch = self.empty, self.rows.numel()
        return _Step(
            from_len=from_len, num_new=1, real_before=real_before, seq_lens_before=self.meta[2], cu_seqlens=self.cu,
            max_new=1, real_index=None, dense=(self.rows, self.t0, self.meta[0], self.meta[1]), stage=(e, e, e),
            move=(e, e, e), tile_starts=e.int(), tile_blocks=e.int(), tile_rows=e, shadow=(e, e), num_tiles=0,
            num_dense=batch, num_move=0, history_bound=history_bound,
        )


def _dense_table(batch: int, device: torch.device) -> torch.Tensor:
    """Row b's sink is pool block 2b and its tail block 2b + 1."""
    return (2 * torch.arange(batch, dtype=torch.int32, device=device)[:, None] + torch.tensor([0, 1], device=device)
            ).to(torch.int32)


def _to_device(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move many small int64 host tensors with one copy."""
    sizes = [p.numel() for p in parts.values()]
    flat = torch.cat([p.reshape(-1).long() for p in parts.values()])
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return dict(zip(parts, flat.split(sizes), strict=True))


class KVarNLayer(CacheLayerMixin):
    """One full-attention layer: KVarN tiles in a paged uint8 cache plus 16-bit sink and tail blocks per row.

    Batch edits (reorder, select, repeat, crop, reset) go through `KVarNCache`, which updates the shared paging
    metadata once and then each layer's data.
    """

    is_compileable = False
    is_sliding = False

    @property
    def is_croppable(self) -> bool:
        """Whether any one-step rollback is exact (it may reopen the newest tile, which needs its 16-bit copy)."""
        return self.paging.keep_last_tile

    def __init__(self, paging: _Paging, preset: str = DEFAULT_PRESET) -> None:
        super().__init__()
        self.paging = paging
        self.preset = preset
        self._drop()

    def _drop(self) -> None:
        self.fmt: KVarNFormat | None = None
        self.tiles: torch.Tensor | None = None  # uint8 [capacity, H, record_bytes]
        self.pool_k: torch.Tensor | None = None  # [2B, H, G, D]: block 2b is row b's sink, 2b + 1 its tail
        self.pool_v: torch.Tensor | None = None
        self.shadow_k: torch.Tensor | None = None  # [B, H, G, D]: 16-bit copy of each row's newest tile, for crop
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
        step = self._step(key_states.shape[2], None)
        hist_k, hist_v = self._history(step)
        keys = torch.cat([hist_k, key_states], dim=2)
        values = torch.cat([hist_v, value_states], dim=2)
        self._append(step, key_states, value_states)
        return keys, values

    def attend(
        self, query: torch.Tensor, pending: PendingKV, scaling: float | None, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """Fused attention of query [B, Hq, T, D] over this layer's history and `pending`; returns [B, T, Hq, D]."""
        if pending is not self.pending:
            raise RuntimeError("this PendingKV does not belong to the layer's latest update")
        self.pending = None
        batch, heads_q, num_new, d = query.shape
        step = self._step(num_new, padding)
        if self.query_energy is not None and step.num_dense:
            self._record_query_energy(step, query)
        if PREFILL_SDPA and step.real_index is None and not any(step.real_before):
            # A prefill (no row has history, none is padded) attends only to its own 16-bit tokens: plain causal
            # attention, which torch's flash SDPA does faster than the paged kernel's 16-bit path.
            out = torch.nn.functional.scaled_dot_product_attention(
                query, pending.keys, pending.values, is_causal=True, scale=scaling, enable_gqa=True)
            self._append(step, pending.keys, pending.values)
            return out.transpose(1, 2)
        q = query.transpose(1, 2).reshape(batch * num_new, heads_q, d)
        k = pending.keys.transpose(1, 2).reshape(batch * num_new, -1, d)
        v = pending.values.transpose(1, 2).reshape(batch * num_new, -1, d)
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
        self._append(step, pending.keys, pending.values)
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

    def _step(self, num_new: int, padding: torch.Tensor | None) -> _Step:
        """The shared step from this layer's length: computed by the first layer to get there, reused by the rest."""
        paging, last = self.paging, self.paging.last_step
        static = paging.static_step
        if static is not None and static.from_len == self.length and num_new == 1:
            return static
        if paging.length == self.length:
            return paging.step(self.length, num_new, padding)
        if last is not None and last.from_len == self.length and last.num_new == num_new:
            return last
        raise RuntimeError(
            f"KVarNCache layers are out of step: this layer holds {self.length} positions, the cache "
            f"{paging.length}; every layer must see the same updates"
        )

    def _record_query_energy(self, step: _Step, query: torch.Tensor) -> None:
        """Store each new position's squared query, [B, Hq, T, D] pooled over the query heads of a KV head, where
        the position's key goes (sink or tail block): the sink's part weighs the K-frame choice of this row's
        tiles (`reference.sink_query_weights`)."""
        batch, heads_q, num_new, d = query.shape
        heads = self.pool_k.shape[1]
        energy = query.float().square().view(batch, heads, heads_q // heads, num_new, d).mean(2)  # [B, H, T, D]
        row, t, blk, slot = step.dense
        self.query_energy[blk, :, slot] = energy.transpose(1, 2)[row, t]

    def _k_weights(self, step: _Step) -> torch.Tensor | None:
        """Channel weights [n_tiles, H, D] of the step's tiles: the mean squared query over their row's sink (full:
        a row completes a tile only from 2G tokens on). None with k_frame='range'."""
        if self.query_energy is None:
            return None
        return self.query_energy[2 * step.tile_rows].mean(2).contiguous()

    def _append(self, step: _Step, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the step's new tokens [B, H, T, D] into sink/tail blocks and quantize the tiles they complete."""
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
            if self.paging.keep_last_tile:
                self._keep_shadow(step, stage_k, stage_v)
        self.length += step.num_new

    def _grow(self) -> None:
        capacity = self.paging.capacity
        if self.tiles.shape[0] < capacity:
            grown = self.fmt.allocate(capacity, self.tiles.shape[1], self.device)
            grown[: self.tiles.shape[0]] = self.tiles
            self.tiles = grown

    def _keep_shadow(self, step: _Step, stage_k: torch.Tensor, stage_v: torch.Tensor) -> None:
        """Keep a 16-bit copy of each row's newest tile, so that crop can reopen it exactly."""
        if self.shadow_k is None:
            self.shadow_k = self.pool_k.new_zeros(self.paging.batch, *self.pool_k.shape[1:])
            self.shadow_v = torch.zeros_like(self.shadow_k)
        rows, tiles = step.shadow
        g = self.fmt.group
        self.shadow_k[rows] = stage_k.view(-1, g, *stage_k.shape[1:])[tiles].transpose(1, 2)
        self.shadow_v[rows] = stage_v.view(-1, g, *stage_v.shape[1:])[tiles].transpose(1, 2)

    def _history(self, step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _crop(self, remove: int, restore: torch.Tensor) -> None:
        if restore.numel():
            self.pool_k[2 * restore + 1] = self.shadow_k[restore]
            self.pool_v[2 * restore + 1] = self.shadow_v[restore]
        self.length -= remove

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: used tiles, allocated tiles, and the 16-bit sink/tail/shadow blocks."""
        if not self.is_initialized:
            return {"tiles_used": 0, "tiles_allocated": 0, "dense": 0}
        held = (self.pool_k, self.pool_v, self.shadow_k, self.shadow_v, self.query_energy)
        dense = sum(t.numel() * t.element_size() for t in held if t is not None)
        per_block = self.tiles.shape[1] * self.tiles.shape[2]
        return {"tiles_used": self.paging.next_block * per_block, "tiles_allocated": self.tiles.numel(),
                "dense": dense}


class KVarNCache(Cache):
    """A transformers Cache that stores full-attention layers as KVarN tiles (see the module docstring).

    `KVarNCache()` uses the default preset (kvarn_k4v2_g128) and builds its layers as the model reaches them;
    `KVarNCache(preset=..., config=model.config)` builds them up front, keeps sliding-window layers in a 16-bit
    window, refuses models it cannot serve, and picks fused mode when the model runs attn_implementation="kvarn".
    `generate()` binds a config-less cache to the model's config itself.

    keep_last_tile: also keep a 16-bit copy of each row's newest quantized tile (one more tile of 16-bit memory per
    row and layer), so that `crop` can undo up to tail + G tokens exactly; assisted `generate()` turns it on.

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
        self._paging = _Paging(PRESETS[preset][2], keep_last_tile, k_frame)
        if config is None:
            super().__init__(layer_class_to_replicate=partial(KVarNLayer, self._paging, preset))
        else:
            super().__init__(layers=self._layers_for(config))
            self._paging.fused = _is_fused(config)

    @property
    def fused(self) -> bool:
        """Whether update() hands attention packed tiles (attn_implementation='kvarn') or dense tensors."""
        return self._paging.fused

    # --- binding to a model ------------------------------------------------------------------------------
    def bind(
        self, config: Any, attention_mask: torch.Tensor | None = None, max_length: int | None = None,
        keep_last_tile: bool = False,
    ) -> None:
        """Adopt a model's config (layer types, fused or dense mode), its batch's padding and a length to reserve.

        `generate()` calls this before the prefill (with keep_last_tile=True for assisted decoding, whose rejected
        drafts are cropped); call it yourself when driving the model by hand.
        """
        self._paging.keep_last_tile |= keep_last_tile
        if self.layer_class_to_replicate is not None:
            if any(layer.is_initialized for layer in self.layers):
                self._check_lazy_layers(config)
            else:
                self.layers = self._layers_for(config)
                self.layer_class_to_replicate = None
        else:
            _validate(config, self.preset)
        self._paging.fused = _is_fused(config)
        if attention_mask is not None:
            self.set_padding(attention_mask)
        if max_length:
            self.reserve(max_length)

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Tell the cache which leading positions of each row are padding (a 2-D mask, 1 = real token).

        Needed before the first forward of a left-padded batch on the dense path outside `generate()`; the fused
        path and `generate()` learn it themselves. On a filled cache the mask must match the stored padding.
        """
        self._paging.set_pads(attention_mask)

    def _layers_for(self, config: Any) -> list[CacheLayerMixin]:
        kinds = _validate(config, self.preset)
        return [KVarNLayer(self._paging, self.preset) if window is None else DynamicSlidingWindowLayer(window)
                for window in kinds]

    def _check_lazy_layers(self, config: Any) -> None:
        kinds = _validate(config, self.preset)
        if any(window is not None for window in kinds):
            raise ValueError(
                "this KVarNCache was filled without the model's config, so its sliding-window layers were "
                "quantized as full attention: build it with KVarNCache(config=model.config)"
            )

    # --- whole-cache edits (the shared paging first, then every layer) ----------------------------------
    def reset(self) -> None:
        self._paging.reset()
        self._decoder = None
        self._graphs_off = False
        for layer in self.layers:
            layer.reset()

    # --- CUDA-graph decode (graphs.py) -------------------------------------------------------------------
    def wants_decode_graphs(self, model: Any) -> bool:
        """Whether `generate()` should run this cache's decode steps through `graphs.DecodeGraphs`: fused mode and
        decode_graphs=True, or decode_graphs=None (the default) on a CUDA model."""
        if not _is_fused(model.config) or self.decode_graphs is False or self._graphs_off:
            return False
        return self.decode_graphs is True or getattr(model, "device", torch.device("cpu")).type == "cuda"

    def decode_graphs_for(self, model: Any) -> Any:
        """The `graphs.DecodeGraphs` runner of `model` over this cache (made once per model)."""
        from .graphs import DecodeGraphs

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

        Exact inside the 16-bit sink and tail, down to any tile boundary, and (with keep_last_tile) inside each row's
        newest quantized tile, so up to tail + G tokens can always be undone (rejected drafts in assisted decoding);
        a crop deeper into quantized history raises ValueError.
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
                    layer._crop(remove, restore)
            else:
                layer.crop(tokens_to_remove)

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


def _is_fused(config: Any) -> bool:
    return getattr(config, "_attn_implementation", None) == "kvarn"


def _validate(config: Any, preset: str) -> list[int | None]:
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
    if _is_fused(config) and getattr(text, "attn_logit_softcapping", None) is not None:
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
