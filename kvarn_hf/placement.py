"""Where the new tokens of one forward step go: host-side index math for sink, tail and tile slots (no state).

Per batch row, real tokens are counted from the row's first real token (left padding is skipped): real tokens
0..G-1 are the row's 16-bit sink, every later full tile of G tokens is quantized once, and the newest partial tile
is the 16-bit tail. Pool block 2b holds row b's sink, block 2b + 1 its tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Step:
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
    num_tiles: int
    num_dense: int
    num_move: int
    history_bound: int | None = None  # bounds every row's history for the kernel's grid; None: max(real_before)
    host_tiles: tuple[torch.Tensor, torch.Tensor] | None = None  # (row, tile column) of each completed tile, host
    # (row, staging tile, shadow slot): completed tiles whose 16-bit copy is kept for crop (see Paging.plan)
    shadow: tuple[torch.Tensor, ...] | None = None
    num_shadow: int = 0


def placement(
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
    cu = torch.cat([torch.zeros(1, dtype=torch.long), (l1 - l0).cumsum(0)])

    parts = {
        "dense_row": dense_idx[0], "dense_t": dense_idx[1], "dense_blk": dense_idx[2], "dense_slot": dense_idx[3],
        "stage_row": stage_idx[0], "stage_t": stage_idx[1], "stage_flat": stage_idx[2],
        "move_blk": move_idx[0], "move_slot": move_idx[1], "move_flat": move_idx[2],
        "tile_starts": torch.arange(num_tiles) * g, "tile_blocks": tile_blocks,
        "tile_rows": tile_rows, "tile_cols": tile_cols, "cu": cu, "seq_lens": l1,
    }
    if not bool(real.all()):
        parts["real_index"] = torch.nonzero(real.flatten()).flatten()
    return parts, new_tiles, nq1


PLACEMENT_KEYS = ("dense_row", "dense_t", "dense_blk", "dense_slot", "stage_row", "stage_t", "stage_flat", "move_blk",
                   "move_slot", "move_flat", "tile_starts", "tile_blocks", "tile_rows", "tile_cols", "cu", "seq_lens")


def decode_placement(
    pads: list[int], from_len: int, g: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """`placement` of one new position per row, from Python ints, for the common decode step: every row's token is
    real and none completes a tile (127 steps in 128), so each goes to its row's sink or tail block. None when
    that does not hold (the general `placement` handles it). Saves ~85 small host tensor ops per step."""
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
    parts = dict.fromkeys(PLACEMENT_KEYS, empty)
    parts.update(dense_row=torch.arange(batch), dense_t=torch.zeros(batch, dtype=torch.long),
                 dense_blk=torch.tensor(blocks, dtype=torch.long), dense_slot=torch.tensor(slots, dtype=torch.long),
                 cu=torch.arange(batch + 1), seq_lens=torch.tensor(after, dtype=torch.long))
    return parts, torch.zeros(batch, dtype=torch.long), torch.tensor(full, dtype=torch.long)



def dense_table(batch: int, device: torch.device) -> torch.Tensor:
    """Row b's sink is pool block 2b and its tail block 2b + 1."""
    return (2 * torch.arange(batch, dtype=torch.int32, device=device)[:, None] + torch.tensor([0, 1], device=device)
            ).to(torch.int32)


def to_device(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move many small int64 host tensors with one copy."""
    sizes = [p.numel() for p in parts.values()]
    flat = torch.cat([p.reshape(-1).long() for p in parts.values()])
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return dict(zip(parts, flat.split(sizes), strict=True))

