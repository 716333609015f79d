"""Forwards of many tokens that must attend like one-token decoding (assisted generation's verification): where
such a forward splits, and the attention mask that gives the dense path the same per-token history.

In plain decoding the prompt is one forward (its tokens see each other in 16-bit) and every later token is its own
forward: token q sees each tile that was complete before q as quantized, the rest in 16-bit. A verification forward
of T draft tokens must give every token exactly that history, whatever T, or assisted outputs would differ from
plain ones by more than float rounding. So a forward past `verify_from` (the prompt's end) is cut after every
position that completes a tile of some row, and at `verify_from` itself: inside one part no tile completes before
its last token, so the part's tokens attend to the stored history plus the part's own 16-bit tokens, as they would
one by one. The fused path runs the parts one after the other; the dense path, whose attention is the model's own,
gets one extended key sequence (stored history, the dequantized tiles completed inside the forward, the new 16-bit
tokens) and a mask that shows each query its version of every key (`dense_mask`).
"""

from __future__ import annotations

import torch


def chunks(pads: list[int], from_len: int, num_new: int, group: int, verify_from: int | None) -> list[int]:
    """Lengths of the consecutive parts of a forward of `num_new` positions from `from_len` (padded frame)."""
    if verify_from is None or num_new <= 1:
        return [num_new]
    end = from_len + num_new
    cuts = {verify_from} if from_len < verify_from < end else set()
    for pad in pads:
        # A row's tile ends at real token k * G - 1 (k >= 2, the sink being the first G): cut right after it when it
        # is a decoded token (at or past verify_from) and inside this forward.
        k = max(2, -(-(max(from_len, verify_from) + 1 - pad) // group))
        while pad + k * group < end:
            cuts.add(pad + k * group)
            k += 1
    bounds = [from_len, *sorted(c for c in cuts if from_len < c < end), end]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def tiles_of(real: torch.Tensor, group: int) -> torch.Tensor:
    """Full tiles held by rows of `real` real tokens (the first G are the sink)."""
    return (real - group).clamp_min(0) // group


def completed_tiles(
    pads: torch.Tensor, from_len: int, parts: list[int], group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first tile that the forward completes and how many it completes before its last part: the tiles
    that later parts of the forward see quantized (the dense path's extra keys). int64 [B] each."""
    before = tiles_of((from_len - pads).clamp_min(0), group)
    last_start = from_len + sum(parts[:-1])
    return before, tiles_of((last_start - pads).clamp_min(0), group) - before


def dense_mask(pads: torch.Tensor, from_len: int, parts: list[int], group: int) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, from_len + X + T] (True = attend) over [stored history | X dequantized tiles completed
    inside the forward | T new tokens], where X = G * the most such tiles of a row; None when X = 0 (the plain
    causal mask over [history | new tokens] already gives every token its decoding history)."""
    first, count = completed_tiles(pads, from_len, parts, group)
    extra = group * int(count.max()) if count.numel() else 0
    if not extra:
        return None
    batch, num_new = pads.shape[0], sum(parts)
    part_of_query = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(parts))  # [T]
    # For every tile a row completes in this forward, the part after which it is complete (its later parts see it
    # quantized); tiles completed before the forward or not at all get a part index no query reaches.
    never = len(parts)
    positions = torch.arange(from_len + num_new)
    real = positions[None, :] - pads[:, None]  # [B, L + T] real index of each key position
    tile = torch.div(real - group, group, rounding_mode="floor")
    done_at = torch.full((batch, from_len + num_new), never)
    ends = from_len + torch.tensor(parts).cumsum(0)  # exclusive end of each part
    for p in range(len(parts) - 1):
        done_tiles = tiles_of((ends[p] - pads).clamp_min(0), group)  # [B] tiles complete after part p
        newly = (tile >= first[:, None]) & (tile < done_tiles[:, None]) & (done_at == never) & (real >= group)
        done_at[newly] = p
    query_pos = from_len + torch.arange(num_new)  # [T]
    visible = (positions[None, None, :] <= query_pos[None, :, None]) & (real[:, None, :] >= 0)  # [B, T, L + T]
    sixteen = visible & (done_at[:, None, :] >= part_of_query[None, :, None])
    # The dequantized copies: slot j of row b holds tile first[b] + j, seen by the parts after the one completing it.
    slot_tile = first[:, None] + torch.arange(extra)[None, :] // group  # [B, X]
    slot_done = never + torch.zeros(batch, extra, dtype=torch.long)
    for p in range(len(parts) - 1):
        done_tiles = tiles_of((ends[p] - pads).clamp_min(0), group)
        slot_done = torch.where((slot_tile < done_tiles[:, None]) & (slot_done == never), p, slot_done)
    quantized = slot_done[:, None, :] < part_of_query[None, :, None]  # [B, T, X]
    mask = torch.cat([sixteen[..., :from_len], quantized, sixteen[..., from_len:]], dim=-1)
    # A padded query position sees no key at all; let it see itself so that attention stays finite (its output is
    # never used).
    own = torch.zeros_like(mask)
    own[:, torch.arange(num_new), from_len + extra + torch.arange(num_new)] = True
    mask |= own & ~mask.any(-1, keepdim=True)
    return mask[:, None]
