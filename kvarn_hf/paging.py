"""The paging state that the KVarN layers of one cache share: per-row padding, lengths, block table, and the
device buffers of CUDA-graph decode steps.

All KVarN layers of one cache see the same tokens, so their paging metadata is one `Paging` object: the first layer
to reach a forward step computes where its tokens go and advances it, the other layers replay that step; batch
edits and crops update it once, from `KVarNCache`.
"""

from __future__ import annotations

import math

import torch

from . import verify
from .placement import Step, decode_placement, dense_table, placement, to_device


class Paging:
    """Paging metadata shared by the KVarN layers of one cache: per-row padding, lengths and block table, and which
    tiles keep a 16-bit copy so that `crop` can reopen them."""

    def __init__(self, group: int, keep_last_tile: bool, k_frame: str = "range") -> None:
        self.group = group
        self.fused = False
        self.keep_last_tile = keep_last_tile
        # Assisted decoding (KVarNCache.bind): the prompt's end; forwards past it attend like one-token decoding
        # (verify.py) and keep the tiles they complete undoable. None: forwards attend as one step.
        self.verify_from: int | None = None
        self.k_frame = k_frame
        self.reserved_tokens = 0
        self._clear()

    def _clear(self) -> None:
        self.batch = 0
        self.device: torch.device | None = None
        self.pads: torch.Tensor | None = None  # int64 [B] on the host: leading padded positions per row
        self.length = 0  # positions seen, padding included (the same for every row)
        self.next_block = 0  # blocks ever handed out; those in free_blocks are handed out again first
        self.free_blocks: list[int] = []  # blocks of tiles dropped by crop or batch edits
        self.capacity = 0  # physical blocks each layer's tile cache must hold
        self.block_table: torch.Tensor | None = None
        self.host_table = torch.zeros(0, 0, dtype=torch.long)  # the block table on the host (to reclaim blocks)
        self.seq_lens: torch.Tensor | None = None
        self.dense_table: torch.Tensor | None = None
        # Per row, tiles [shadow_lo, shadow_hi) have a 16-bit copy, tile t in slot t - shadow_lo of each layer's
        # shadow blocks; shadow_slots is the most slots a row uses.
        self.shadow_lo = torch.zeros(0, dtype=torch.long)
        self.shadow_hi = torch.zeros(0, dtype=torch.long)
        self.shadow_slots = 0
        self.last_plan: list[Step] | None = None  # the latest forward's steps, replayed by the layers reaching it later
        self.static: StaticDecode | None = None  # device buffers of CUDA-graph decode steps (graphs.py)
        self.static_step: Step | None = None  # the static decode step in progress, if any

    def start(self, batch: int, device: torch.device) -> None:
        if self.device is None:
            if self.pads is not None and self.pads.shape[0] != batch:
                raise ValueError(f"the padding mask has {self.pads.shape[0]} rows but the batch has {batch}")
            self.batch, self.device = batch, device
            self.block_table = torch.zeros(batch, 0, dtype=torch.int32, device=device)
            self.host_table = torch.zeros(batch, 0, dtype=torch.long)
            self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
            self.dense_table = dense_table(batch, device)
            self.shadow_lo = torch.zeros(batch, dtype=torch.long)
            self.shadow_hi = torch.zeros(batch, dtype=torch.long)
            self.reserve(self.reserved_tokens)
        elif (batch, device) != (self.batch, self.device):
            raise ValueError(
                f"KVarNCache holds a batch of {self.batch} rows on {self.device} but got {batch} rows on {device}: "
                "all layers must be on one device, and the batch of a filled cache changes only through "
                "reorder/select/repeat; for another batch use a new KVarNCache() or call reset() first"
            )

    @property
    def croppable(self) -> bool:
        return self.keep_last_tile or self.verify_from is not None

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

    def tiles_at(self, length: int) -> torch.Tensor:
        """Full tiles per row (host int64 [B]) once `length` positions are seen."""
        return verify.tiles_of(self.real_lengths(length), self.group)

    # --- one forward ----------------------------------------------------------------------------------------
    def plan(self, from_len: int, num_new: int, padding: torch.Tensor | None) -> list[Step]:
        """Advance by the `num_new` positions of one forward: one step, or one per part of a verification forward
        (verify.py); marks which of the tiles they complete keep a 16-bit copy."""
        if self.pads is None:
            self.set_pads(padding)
        if self.verify_from is None or num_new == 1:  # (decode steps: no host work beyond the step itself)
            parts = [num_new]
        else:
            parts = verify.chunks(self.pads.tolist(), from_len, num_new, self.group, self.verify_from)
        before = self.tiles_at(from_len) if self.croppable else None
        steps, at = [], from_len
        for n in parts:
            steps.append(self.step(at, n))
            at += n
        if before is not None and any(step.num_tiles for step in steps):
            self._keep_copies(steps, before, self.tiles_at(at))
        self.last_plan = steps
        return steps

    def _keep_copies(self, steps: list[Step], before: torch.Tensor, after: torch.Tensor) -> None:
        """Choose the tiles of this forward that keep a 16-bit copy: the newest with keep_last_tile, and in assisted
        decoding all those ending past the prompt (the prompt is never cropped, drafts may all be); rows that
        completed no tile keep their earlier copies."""
        done = after > before
        lo = after - 1 if self.keep_last_tile else after.clone()
        if self.verify_from is not None:
            # Tile t of a row padded by p ends at position p + (t + 2) G - 1.
            first = -(-(self.verify_from + 1 - self.pads) // self.group) - 2
            lo = torch.minimum(lo, torch.maximum(first, before))
        self.shadow_lo = torch.where(done, lo, self.shadow_lo)
        self.shadow_hi = torch.where(done, after, self.shadow_hi)
        self.shadow_slots = max(self.shadow_slots, int((self.shadow_hi - self.shadow_lo).max()))
        for step in steps:
            if not step.num_tiles:
                continue
            rows, cols = step.host_tiles
            keep = done[rows] & (cols >= self.shadow_lo[rows]) & (cols < self.shadow_hi[rows])
            if bool(keep.any()):
                staged = torch.arange(step.num_tiles)
                parts = {"row": rows[keep], "tile": staged[keep], "slot": (cols - self.shadow_lo[rows])[keep]}
                dev = to_device(parts, self.device)
                step.shadow = (dev["row"], dev["tile"], dev["slot"])
                step.num_shadow = int(keep.sum())

    def step(self, from_len: int, num_new: int) -> Step:
        """Advance by `num_new` positions: place every new token and allocate the tiles they complete."""
        fast = decode_placement(self.pads.tolist(), from_len, self.group) if num_new == 1 else None
        parts, new_tiles, nq1 = fast or placement(self.pads, from_len, num_new, self.group, self.next_block)
        batch, num_tiles = self.batch, int(new_tiles.sum())
        if num_tiles:  # blocks freed by crops and batch edits first, then new ones
            reuse = min(num_tiles, len(self.free_blocks))
            fresh = torch.arange(self.next_block, self.next_block + num_tiles - reuse)
            parts["tile_blocks"] = torch.cat([torch.tensor(self.free_blocks[:reuse], dtype=torch.long), fresh])
            del self.free_blocks[:reuse]
            self.next_block += num_tiles - reuse
        l0 = self.real_lengths(from_len)
        n_real = parts["seq_lens"] - l0
        host_tiles = (parts["tile_rows"], parts["tile_cols"])
        dev = to_device(parts, self.device)
        seq_lens_before = self.seq_lens
        self._widen(int(nq1.max()) if batch else 0)
        if self.next_block > self.capacity:  # grow geometrically: each growth copies every layer's tiles
            self.capacity = max(self.next_block, math.ceil(self.capacity * 1.5))
        if num_tiles:
            self.block_table[dev["tile_rows"], dev["tile_cols"]] = dev["tile_blocks"].to(torch.int32)
            self.host_table[host_tiles] = parts["tile_blocks"]
        self.seq_lens = dev["seq_lens"].to(torch.int32)
        self.length = from_len + num_new
        return Step(
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
            num_tiles=num_tiles,
            num_dense=parts["dense_row"].numel(),
            num_move=parts["move_blk"].numel(),
            host_tiles=host_tiles,
        )

    def begin_static_step(self, history_bound: int) -> Step | None:
        """Advance by one decode token per row through the static device buffers of `self.static` (which a
        captured CUDA graph reads), or return None when the step is not a plain decode step: a row completes a
        tile (the quantize launch and the block-table update run eagerly) or has no real token yet.

        The returned step is what every layer uses until `end_static_step`; history_bound must be at least every
        row's history (it sizes the kernel's split grid, fixed in a graph)."""
        if self.device is None or self.pads is None:
            return None
        fast = decode_placement(self.pads.tolist(), self.length, self.group)
        if fast is None:
            return None
        parts, _, _ = fast
        if self.static is None:
            self.static = StaticDecode(self.batch, self.device)
        before = self.real_lengths(self.length)
        self.static.load(parts["dense_blk"], parts["dense_slot"], before, parts["seq_lens"])
        step = self.static.step(self.length, before.tolist(), history_bound)
        self.seq_lens = self.static.meta[3]  # the lengths after the step
        self.length += 1
        self.last_plan = None
        self.static_step = step
        return step

    def end_static_step(self) -> None:
        self.static_step = None

    def _widen(self, tiles: int) -> None:
        have = self.block_table.shape[1]
        if tiles > have:
            pad = torch.zeros(self.batch, tiles - have, dtype=torch.int32, device=self.device)
            self.block_table = torch.cat([self.block_table, pad], dim=1)
            self.host_table = torch.cat([self.host_table, torch.zeros(self.batch, tiles - have, dtype=torch.long)], 1)

    # --- batch and length edits ---------------------------------------------------------------------------
    def crop(self, remove: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the last `remove` positions; returns (rows, shadow slots) of the rows whose reopened tile must be
        restored from its 16-bit copy into the tail block."""
        new_len = self.length - remove
        nq_old, nq_new = self.tiles_at(self.length), self.tiles_at(new_len)
        tail_new = (self.real_lengths(new_len) - self.group).clamp_min(0) % self.group
        restore = (nq_new < nq_old) & (tail_new > 0)
        copied = (self.shadow_lo <= nq_new) & (nq_new < self.shadow_hi)
        bad = restore & ~copied
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"crop(-{remove}) would cut into quantized tile {int(nq_new[b])} of row {b}, which no longer has a "
                "16-bit copy: KVarNCache can undo tokens in the 16-bit sink and tail, each row's newest quantized "
                "tile when built with keep_last_tile=True, and every tile the latest forward completed past the "
                "prompt when bound with verify_from (assisted generate() does this), not older history"
            )
        rows = torch.nonzero(restore).flatten()
        slots = (nq_new - self.shadow_lo)[rows]
        self.length = new_len
        self.last_plan = None
        self.seq_lens = self.real_lengths(new_len).to(torch.int32).to(self.device)
        self.shadow_hi = torch.minimum(self.shadow_hi, nq_new)  # reopened or dropped tiles lose their copy
        self.shadow_lo = torch.minimum(self.shadow_lo, self.shadow_hi)
        self._reclaim(nq_new)
        return rows.to(self.device), slots.to(self.device)

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep/reorder/repeat batch rows (host int64 indices); returns the indices on the device."""
        rows_dev = rows.to(self.device)
        live = self.tiles_at(self.length)
        self.pads = self.pads[rows] if self.pads is not None else None
        self.batch = rows.numel()
        self.block_table = self.block_table.index_select(0, rows_dev)
        self.host_table = self.host_table[rows]
        self.seq_lens = self.seq_lens.index_select(0, rows_dev)
        self.dense_table = dense_table(self.batch, self.device)
        self.shadow_lo, self.shadow_hi = self.shadow_lo[rows], self.shadow_hi[rows]
        self.last_plan = None
        self.static = None
        self._reclaim(live[rows])
        return rows_dev

    def _reclaim(self, tiles: torch.Tensor) -> None:
        """Return to free_blocks every handed-out block that no row's first `tiles` [B] tiles use any more."""
        used = self.host_table[torch.arange(self.host_table.shape[1])[None, :] < tiles[:, None]]
        handed, free = torch.arange(self.next_block), torch.tensor(self.free_blocks, dtype=torch.long)
        unused = handed[~torch.isin(handed, used) & ~torch.isin(handed, free)]
        self.free_blocks.extend(unused.tolist())

    def reset(self) -> None:
        self._clear()


class StaticDecode:
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

    def step(self, from_len: int, real_before: list[int], history_bound: int) -> Step:
        e, batch = self.empty, self.rows.numel()
        return Step(
            from_len=from_len, num_new=1, real_before=real_before, seq_lens_before=self.meta[2], cu_seqlens=self.cu,
            max_new=1, real_index=None, dense=(self.rows, self.t0, self.meta[0], self.meta[1]), stage=(e, e, e),
            move=(e, e, e), tile_starts=e.int(), tile_blocks=e.int(), tile_rows=e, num_tiles=0, num_dense=batch,
            num_move=0, history_bound=history_bound,
        )
