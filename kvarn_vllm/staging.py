"""Where each new token of a serving step goes: 16-bit staging slots, quantized tiles, or nowhere yet.

vLLM hands a layer the step's new K/V ([T, H, D], varlen rows) and a block table whose block i holds the
sequence's tokens [i*G, (i+1)*G). KVarN keeps, per request, two 16-bit staging slots in one pool
[2 (P + 1), H, G + X, D] (P request slots plus a trash slot; X = speculative tokens, rounded up):
  - slot s (the sink): tokens [0, G), for the request's whole life;
  - slot P + 1 + s (the tail): tokens [base, ...) of the frontier tile, base = max(frontier, G), plus up to X
    tokens past it (speculated tokens that may still be rejected).
The frontier (per slot, on the device) is the first token of the oldest tile not yet quantized. A tile is
quantized into its vLLM block only once its tokens are certain: every token of a row but its last S (the
speculated ones) is. So a rejected draft token never reaches a quantized tile, and at attention time the state
is exactly what `kvarn_kernels.PagedKV` describes: sink, quantized tiles 1 .. n, tail (< G tokens).

Per step the plan below is computed once (device tensors, fixed shapes, no host sync) and every layer applies
it: `pre` (quantize a tile that became certain since the last step, move the overflow down), `commit` (write new
tokens to slots, quantize tiles completed by this step: nothing a row's attention reads in this step), attention,
`finish` (restart the tail slots of rows whose frontier moved). A pure decode step (one token per row,
no speculation) commits before attention, so the decode kernel reads the new token from the tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvarn_kernels import KVarNFormat, ops


@dataclass
class StepPlan:
    """Index tensors for one serving step (all on the device; shapes fixed by the step's padded sizes)."""

    hist: torch.Tensor  # int32 [B] history length the attention kernel reads (committed tokens)
    dense_table: torch.Tensor  # int32 [B, 2] (sink slot, tail slot) rows of the pool
    pre_starts: torch.Tensor  # int32 [B] tile start in the strided pool view
    pre_blocks: torch.Tensor  # int32 [B] destination block, -1: nothing to quantize
    shift_rows: torch.Tensor  # int64 [B] tail slot whose overflow moves down (trash slot when none)
    write1_slot: torch.Tensor  # int64 [T] pool row of each new token before tiles complete (trash when none)
    write1_off: torch.Tensor  # int64 [T]
    comp_starts: torch.Tensor  # int32 [B]
    comp_blocks: torch.Tensor  # int32 [B]
    chunk_starts: torch.Tensor  # int32 [B * C] token index in the step's K/V
    chunk_blocks: torch.Tensor  # int32 [B * C]
    write2_slot: torch.Tensor  # int64 [T] pool row after chunk tiles moved the frontier (trash when none)
    write2_off: torch.Tensor  # int64 [T]
    has_pre: bool  # any speculation: a tile may wait for certainty
    has_chunks: bool  # rows long enough to hold a whole tile of new tokens
    has_write2: bool  # rows of several tokens: the frontier may move past some of them
    commit_first: bool  # pure decode: commit before attention, attend without k_new


def speculative_tokens(spec: Any) -> int:
    """num_speculative_tokens of a speculative config (vLLM's object, or the dict EngineArgs holds), 0 without."""
    if spec is None:
        return 0
    value = spec.get("num_speculative_tokens") if isinstance(spec, dict) else getattr(spec, "num_speculative_tokens",
                                                                                      0)
    return int(value or 0)


def overflow_rows(num_speculative: int) -> int:
    """X: rows past a tile that a tail slot keeps for tokens still speculative (rounded up to 8)."""
    return (num_speculative + 7) // 8 * 8


class StagingPool:
    """The 16-bit staging pool of one layer: K and V [2 (P + 1), H, G + X, D]."""

    def __init__(self, fmt: KVarNFormat, num_slots: int, num_kv_heads: int, overflow: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.fmt, self.num_slots, self.overflow = fmt, num_slots, overflow
        rows = fmt.group + overflow
        shape = (2 * (num_slots + 1), num_kv_heads, rows, fmt.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def nbytes(fmt: KVarNFormat, num_slots: int, num_kv_heads: int, overflow: int, dtype: torch.dtype) -> int:
        return (num_slots + 1) * StagingPool.request_bytes(fmt, num_kv_heads, overflow, dtype)

    @staticmethod
    def request_bytes(fmt: KVarNFormat, num_kv_heads: int, overflow: int, dtype: torch.dtype) -> int:
        """One request's share of a layer's pool: K and V of its sink and tail slots."""
        item = torch.tensor([], dtype=dtype).element_size()
        return 2 * 2 * num_kv_heads * (fmt.group + overflow) * fmt.head_dim * item

    def copy_sink(self, src: int, dst: int) -> None:
        """Slot dst's sink (tokens [0, G)) becomes a copy of slot src's."""
        g = self.fmt.group
        self.k[dst, :, :g] = self.k[src, :, :g]
        self.v[dst, :, :g] = self.v[src, :, :g]

    def source_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool seen as [T, H, D] token rows, so that pool row r's tile is tile_start r * H * (G + X): the
        quantize kernel takes a strided source and reads a tile at tile_start * stride_t + h * stride_h."""
        n, h, rows, d = self.k.shape
        size = ((n - 1) * h + 1) * rows
        strides = (d, rows * d, 1)
        return (torch.as_strided(self.k, (size, h, d), strides), torch.as_strided(self.v, (size, h, d), strides))

    def pre(self, plan: StepPlan, cache: torch.Tensor) -> None:
        if not plan.has_pre:
            return
        ks, vs = self.source_view()
        ops.quantize_into_cache(ks, vs, plan.pre_starts, plan.pre_blocks, cache, self.fmt)
        if self.overflow:
            g, x = self.fmt.group, self.overflow
            rows = plan.shift_rows
            self.k[rows, :, :x] = self.k[rows, :, g:g + x]
            self.v[rows, :, :x] = self.v[rows, :, g:g + x]

    def post(self, plan: StepPlan, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor) -> None:
        self.commit(plan, key, value, cache)
        self.finish(plan, key, value)

    def commit(self, plan: StepPlan, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor) -> None:
        """The writes no row's attention in this step can see: new tokens at slot rows past every row's history,
        tiles quantized into blocks past it. Done before attention, so that a prefix hit scheduled in the same step
        as the request that computes its blocks reads them (vLLM offers such hits)."""
        t = plan.write1_slot.shape[0]
        key, value = key[:t], value[:t]
        self.k[plan.write1_slot, :, plan.write1_off] = key
        self.v[plan.write1_slot, :, plan.write1_off] = value
        ks, vs = self.source_view()
        ops.quantize_into_cache(ks, vs, plan.comp_starts, plan.comp_blocks, cache, self.fmt)
        if plan.has_chunks:
            ops.quantize_into_cache(key, value, plan.chunk_starts, plan.chunk_blocks, cache, self.fmt)

    def finish(self, plan: StepPlan, key: torch.Tensor, value: torch.Tensor) -> None:
        """Where the step moved a frontier, the tail slot restarts: this rewrites rows the step's attention reads,
        so it runs after attention."""
        if plan.has_write2:
            t = plan.write2_slot.shape[0]
            self.k[plan.write2_slot, :, plan.write2_off] = key[:t]
            self.v[plan.write2_slot, :, plan.write2_off] = value[:t]


def plan_step(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    row_slot: torch.Tensor,
    frontier: torch.Tensor,
    num_tokens: int,
    max_query_len: int,
    fmt: KVarNFormat,
    num_slots: int,
    num_kv_heads: int,
    overflow: int,
    num_speculative: int,
) -> StepPlan:
    """The step's plan; also advances `frontier` (int32 [P + 1]) for the slots of this step's rows.

    query_start_loc int32 [B + 1], seq_lens int32 [B] (tokens after this step), block_table int32 [B, W],
    row_slot int32 [B] (padding rows: the trash slot P). num_tokens: rows of the step's K/V (padded).
    """
    g, p, x, s = fmt.group, num_slots, overflow, num_speculative
    dev = seq_lens.device
    rows_per_slot = g + x
    i32, i64 = torch.int32, torch.int64
    b = seq_lens.shape[0]
    slot = row_slot[:b].long()
    qsl = query_start_loc[: b + 1].long()
    q = qsl[1:] - qsl[:-1]
    total = seq_lens.long()
    valid = slot < p
    committed = torch.where(valid, total - q, 0)  # L: tokens attention reads from the cache
    certain = torch.where(valid, torch.maximum(total - s, committed), 0)  # C: tokens that will never be rejected
    front = frontier[slot].long()
    tail_row = p + 1 + slot
    width = block_table.shape[1]

    def block_of(start: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        col = (start // g).clamp(0, width - 1)
        blk = block_table[:b].long().gather(1, col[:, None])[:, 0]
        return torch.where(ok & valid, blk, -1).to(i32)

    def frontier_start(f: torch.Tensor) -> torch.Tensor:
        row = torch.where(f == 0, slot, tail_row)  # tile 0 lives in the sink slot
        return row * num_kv_heads * rows_per_slot  # see StagingPool.source_view

    # pre: the frontier tile became certain after the step that wrote it (speculation only).
    pending = valid & (front + g <= committed)
    pre_blocks = block_of(front, pending)
    pre_starts = frontier_start(front)
    shift_rows = torch.where(pending & (front >= g), tail_row, 2 * p + 1)
    f1 = front + g * pending.long()

    # post, pass 1: every new token to its slot relative to f1; then the frontier tile if this step completes it.
    tok = torch.arange(num_tokens, device=dev)
    tok_row = torch.searchsorted(qsl[1:], tok, right=True).clamp(max=max(b - 1, 0))
    tok_ok = tok < qsl[-1] if b else torch.zeros_like(tok, dtype=torch.bool)
    pos = committed[tok_row] + (tok - qsl[tok_row])
    tok_valid = tok_ok & valid[tok_row]
    trash = torch.full_like(tok, p)
    base1 = torch.clamp(f1, min=g)[tok_row]
    in_sink = tok_valid & (pos < g)
    in_tail1 = tok_valid & (pos >= base1) & (pos - base1 < rows_per_slot)
    write1_slot = torch.where(in_sink, slot[tok_row], torch.where(in_tail1, tail_row[tok_row], trash))
    write1_off = torch.where(in_sink, pos, torch.where(in_tail1, pos - base1, 0))
    comp = valid & (f1 + g <= certain)
    comp_blocks = block_of(f1, comp)
    comp_starts = frontier_start(f1)
    f1c = f1 + g * comp.long()

    # post, chunk tiles: whole certain tiles made of this step's tokens (prefill chunks), straight from K/V.
    per_row = max_query_len // g
    if per_row:
        j = torch.arange(per_row, device=dev)
        starts = f1c[:, None] + g * j[None, :]  # [B, C] positions
        ok = valid[:, None] & (starts + g <= certain[:, None]) & (starts >= committed[:, None])
        n_chunk = ok.long().sum(1)
        tok_index = qsl[:-1, None] + (starts - committed[:, None])
        col = (starts // g).clamp(0, width - 1)
        blk = block_table[:b].long().gather(1, col)
        chunk_blocks = torch.where(ok, blk, -1).to(i32).reshape(-1)
        chunk_starts = torch.where(ok, tok_index, 0).to(i32).reshape(-1)
    else:
        n_chunk = torch.zeros_like(f1c)
        chunk_blocks = chunk_starts = torch.zeros(0, dtype=i32, device=dev)
    f2 = f1c + g * n_chunk

    # post, pass 2: where this step moved the frontier, the tokens after it are rewritten relative to it (they all
    # come from this step: the frontier only moves past tokens it quantized, and f1 + G > L).
    moved = (f2 > f1)[tok_row]
    base2 = torch.clamp(f2, min=g)[tok_row]
    in_tail2 = tok_valid & moved & (pos >= base2) & (pos - base2 < rows_per_slot)
    write2_slot = torch.where(in_tail2, tail_row[tok_row], trash)
    write2_off = torch.where(in_tail2, pos - base2, 0)

    frontier.index_put_((slot,), f2.to(frontier.dtype))
    commit_first = s == 0 and max_query_len == 1
    hist = total if commit_first else committed
    dense_table = torch.stack([slot, tail_row], 1).to(i32)
    return StepPlan(
        hist=hist.to(i32), dense_table=dense_table,
        pre_starts=pre_starts.to(i32), pre_blocks=pre_blocks, shift_rows=shift_rows.to(i64),
        write1_slot=write1_slot.to(i64), write1_off=write1_off.to(i64),
        comp_starts=comp_starts.to(i32), comp_blocks=comp_blocks,
        chunk_starts=chunk_starts, chunk_blocks=chunk_blocks,
        write2_slot=write2_slot.to(i64), write2_off=write2_off.to(i64),
        has_pre=s > 0, has_chunks=per_row > 0, has_write2=max_query_len > 1, commit_first=commit_first,
    )


# The share of the GPU memory vLLM may use that the staging pools take when vLLM picks max_num_seqs: 5 % keeps a
# Llama-3.1-8B-shaped model on an 80 GB GPU at 4.4x bf16's token capacity (112 requests' slots, 3.8 GB).
STAGING_SHARE = 0.05


def default_max_num_seqs(request_bytes: int, usable_bytes: int, vllm_default: int,
                         share: float = STAGING_SHARE) -> int:
    """max_num_seqs when the user gave none: vLLM's default, or fewer (a multiple of 8, at least 8) where that many
    requests' 16-bit staging slots (`request_bytes` each, over all layers) would take more than `share` of
    `usable_bytes` (gpu_memory_utilization x device memory) away from the quantized KV cache."""
    if request_bytes <= 0 or usable_bytes <= 0:
        raise ValueError(f"request_bytes={request_bytes} and usable_bytes={usable_bytes} must be positive")
    fits = int(share * usable_bytes // request_bytes) // 8 * 8
    return min(vllm_default, max(8, fits))
