"""The paged KV state that attention reads: quantized tiles plus 16-bit sink and tail blocks per sequence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .format import KVarNFormat


@dataclass
class PagedKV:
    """Where each sequence's history lives.

    A sequence of L history tokens is laid out as
      - sink: tokens [0, min(L, G)) in 16-bit, block `dense_table[b, 0]` of sink_k/sink_v [Ns, H, G, D];
      - quantized tiles: n_quant = max(L - G, 0) // G full tiles, tile i in cache[block_table[b, i]];
      - tail: the remaining max(L - G, 0) % G tokens in 16-bit, block `dense_table[b, 1]` of tail_k/tail_v.
    A tile is quantized as soon as it is full, so the tail always holds fewer than G tokens.
    Front-ends may pass the same pool as sink and tail (vLLM) or separate per-batch tensors (transformers).
    """

    fmt: KVarNFormat
    cache: torch.Tensor  # uint8 [num_blocks, H, record_bytes]
    block_table: torch.Tensor  # int32 [B, max_tiles]
    # int32 [B], history tokens: >= 0 and covered by block_table. Device values, not checked per call (that needs a
    # sync; `check_tables` does); a negative entry may leave its sequence's decode output unwritten (row-group launches
    # return early on it).
    seq_lens: torch.Tensor
    sink_k: torch.Tensor  # [Ns, H, G', D] 16-bit (or float32), G' >= G token rows per block
    sink_v: torch.Tensor
    tail_k: torch.Tensor  # [Nt, H, G, D]
    tail_v: torch.Tensor
    dense_table: torch.Tensor  # int32 [B, 2]: (sink block, tail block)

    def max_tiles(self, max_history: int | None = None) -> int:
        """A host bound on every sequence's quantized tiles: the block table's width, or fewer when max_history
        (a host bound on every sequence's cached length) says so. Kernels size their grids and scratch by it."""
        tiles = self.block_table.shape[1]
        if max_history is not None:
            tiles = min(tiles, max(0, max_history - self.fmt.group) // self.fmt.group)
        return tiles

    def split_length(self, length: int) -> tuple[int, int, int]:
        """(sink tokens, quantized tiles, tail tokens) of a history of `length` tokens."""
        return _split(length, self.fmt.group)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.cache.shape[1]

    def validate(self) -> None:
        """Shape, dtype and device checks with messages that name the offending value."""
        fmt = self.fmt
        fmt.check_cache(self.cache)
        h, g, d = self.num_kv_heads, fmt.group, fmt.head_dim
        for name in ("sink_k", "sink_v", "tail_k", "tail_v"):
            t = getattr(self, name)
            # A block may hold more than G token rows (vLLM stages speculative tokens past the tile); kernels read
            # the first G through the tensor's strides.
            if t.dim() != 4 or t.shape[1] != h or t.shape[2] < g or t.shape[3] != d:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [N, {h}, >= {g}, {d}]")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
            if t.device != self.cache.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.cache.device}")
        if self.sink_k.dtype != self.tail_k.dtype or self.sink_v.dtype != self.sink_k.dtype:
            raise ValueError("sink and tail pools must share one dtype")
        b = self.batch_size
        for name, t, cols in (("block_table", self.block_table, None), ("dense_table", self.dense_table, 2)):
            if t.dtype != torch.int32 or t.dim() != 2 or t.shape[0] != b or (cols and t.shape[1] != cols):
                raise ValueError(
                    f"{name} must be int32 [{b}, {cols or 'max_tiles'}], got {t.dtype} {tuple(t.shape)}"
                )
        if self.seq_lens.dtype != torch.int32 or self.seq_lens.dim() != 1:
            raise ValueError(f"seq_lens must be int32 [B], got {self.seq_lens.dtype} {tuple(self.seq_lens.shape)}")

    def check_tables(self, max_history: int | None = None) -> None:
        """Check the device-side metadata the kernels trust (this synchronizes with the device: for debugging and
        tests; `KVARN_CHECK_TABLES=1` makes every attention call run it). Raises ValueError naming the sequence and
        the value when a history length is negative or above max_history (the host bound a caller passed), needs more
        tiles than its block-table row holds, or a block id it reads lies outside its pool (quantized tiles: the
        cache's blocks; sink and tail, where they hold tokens: their pools' blocks)."""
        g = self.fmt.group
        lens = self.seq_lens.tolist()
        table = self.block_table.cpu()
        dense = self.dense_table.cpu().tolist()
        pools = (("sink", self.sink_k.shape[0]), ("tail", self.tail_k.shape[0]))
        for b, length in enumerate(lens):
            if length < 0 or (max_history is not None and length > max_history):
                bound = f"[0, {max_history}]" if max_history is not None else ">= 0"
                raise ValueError(f"seq_lens[{b}] = {length}: a history length must be {bound}")
            sink, tiles, tail = _split(length, g)
            if tiles > table.shape[1]:
                raise ValueError(f"sequence {b} ({length} tokens) has {tiles} quantized tiles but its block_table row "
                                 f"holds {table.shape[1]}")
            ids = table[b, :tiles]
            bad = ((ids < 0) | (ids >= self.cache.shape[0])).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"block_table[{b}, {i}] = {int(ids[i])}: tile {i} of sequence {b} must be a block of "
                                 f"the cache, [0, {self.cache.shape[0]})")
            for col, ((name, blocks), used) in enumerate(zip(pools, (sink, tail), strict=True)):
                if used and not 0 <= dense[b][col] < blocks:
                    raise ValueError(f"dense_table[{b}, {col}] = {dense[b][col]}: sequence {b}'s {name} block must be "
                                     f"in [0, {blocks})")


def build_paged_kv(
    k_seqs: list[torch.Tensor],
    v_seqs: list[torch.Tensor],
    fmt: KVarNFormat,
    quantize: Callable[..., None],
    extra_blocks: int = 0,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """A PagedKV holding sequences given as dense k/v [L_b, H, D] (original frame).

    Tiles go to a shuffled set of physical blocks (so tests exercise real paging); `quantize` is
    `quantize.quantize_into_cache` or `reference.quantize_into_cache_ref`. Used by tests and benchmarks.
    """
    device, dtype = k_seqs[0].device, k_seqs[0].dtype
    h, d, g = k_seqs[0].shape[1], fmt.head_dim, fmt.group
    batch = len(k_seqs)
    splits = [_split(k.shape[0], g) for k in k_seqs]
    n_tiles = [s[1] for s in splits]
    max_tiles = max(max(n_tiles), 1)
    total = sum(n_tiles) + extra_blocks
    perm = torch.randperm(max(total, 1), generator=generator).to(torch.int32)
    cache = fmt.allocate(max(total, 1), h, device)
    block_table = torch.zeros(batch, max_tiles, dtype=torch.int32)
    sink_k = torch.zeros(batch, h, g, d, dtype=dtype, device=device)
    sink_v, tail_k, tail_v = torch.zeros_like(sink_k), torch.zeros_like(sink_k), torch.zeros_like(sink_k)
    used = 0
    for b, (k, v) in enumerate(zip(k_seqs, v_seqs, strict=True)):
        sink_len, nq, tail_len = splits[b]
        sink_k[b, :, :sink_len] = k[:sink_len].transpose(0, 1)
        sink_v[b, :, :sink_len] = v[:sink_len].transpose(0, 1)
        tail0 = g * (1 + nq)
        tail_k[b, :, :tail_len] = k[tail0 : tail0 + tail_len].transpose(0, 1)
        tail_v[b, :, :tail_len] = v[tail0 : tail0 + tail_len].transpose(0, 1)
        if nq:
            blocks = perm[used : used + nq]
            block_table[b, :nq] = blocks
            starts = (g * (1 + torch.arange(nq))).to(torch.int32)
            quantize(k.contiguous(), v.contiguous(), starts.to(device), blocks.to(device), cache, fmt)
            used += nq
    return PagedKV(
        fmt=fmt,
        cache=cache,
        block_table=block_table.to(device),
        seq_lens=torch.tensor([k.shape[0] for k in k_seqs], dtype=torch.int32, device=device),
        sink_k=sink_k, sink_v=sink_v, tail_k=tail_k, tail_v=tail_v,
        dense_table=torch.arange(batch, dtype=torch.int32, device=device)[:, None].repeat(1, 2),
    )


def _split(length: int, group: int) -> tuple[int, int, int]:
    rest = max(length - group, 0)
    return min(length, group), rest // group, rest % group
