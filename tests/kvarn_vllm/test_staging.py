"""The serving-step plan: random schedules (chunked prefill, decode, speculation with rejections, prefix hits)
must leave exactly the state the attention kernel expects — sink and tail 16-bit and exact, every complete tile
quantized from its true (accepted) tokens, never from a rejected draft."""

from __future__ import annotations

import random

import pytest
import torch

from kvarn_kernels import KVarNFormat, PagedKV, reference
from kvarn_vllm.staging import StagingPool, plan_step

H, D = 2, 64


def _fmt() -> KVarNFormat:
    return KVarNFormat.from_preset("kvarn_k4v2_g64", D, torch.float32)


class Request:
    def __init__(self, slot: int, length: int, gen: torch.Generator, blocks: list[int], start: int = 0):
        self.slot, self.blocks = slot, blocks
        self.k = torch.randn(length, H, D, generator=gen)
        self.v = torch.randn(length, H, D, generator=gen)
        self.done = start  # committed tokens


def _run(schedule_seed: int, spec: int, steps: int = 24, prefix_hit: bool = False) -> None:
    fmt = _fmt()
    g = fmt.group
    rnd = random.Random(schedule_seed)
    gen = torch.Generator().manual_seed(schedule_seed)
    slots, overflow = 3, (spec + 15) // 16 * 16 if spec else 0
    pool = StagingPool(fmt, slots, H, overflow, torch.float32, "cpu")
    width = 8
    cache = fmt.allocate(slots * width + 1, H)
    frontier = torch.zeros(slots + 1, dtype=torch.int32)
    reqs = []
    for s in range(slots):
        blocks = list(range(s * width, (s + 1) * width))
        reqs.append(Request(s, g * width - 1, gen, blocks))
    if prefix_hit:
        # Request 0 starts with a cached prefix of 2 tiles: its sink slot and tile 1 are filled as the prefix cache
        # (another request's blocks and a retained sink) would leave them.
        r = reqs[0]
        pool.k[r.slot, :, :g] = r.k[:g].transpose(0, 1)
        pool.v[r.slot, :, :g] = r.v[:g].transpose(0, 1)
        reference.quantize_into_cache_ref(r.k, r.v, torch.tensor([g], dtype=torch.int32),
                                          torch.tensor([r.blocks[1]], dtype=torch.int32), cache, fmt)
        r.done = 2 * g
        frontier[r.slot] = 2 * g
    for _ in range(steps):
        active = [r for r in reqs if r.done < r.k.shape[0] - spec - 1]
        if not active:
            break
        rows, qs, keys, vals, accepted = [], [], [], [], []
        for r in active:
            remaining = r.k.shape[0] - r.done
            if rnd.random() < 0.3:
                q = min(remaining, rnd.randint(2, 3 * g))  # a prefill-like chunk: every token certain
                n_draft = 0
            else:
                n_draft = spec
                q = 1 + n_draft
            k_step = r.k[r.done:r.done + q].clone()
            v_step = r.v[r.done:r.done + q].clone()
            # Drafts: tokens after the first of a speculative row may be rejected; a rejected draft's K/V are
            # wrong values (the true token is recomputed at that position later).
            acc = q if n_draft == 0 else 1 + rnd.randint(0, n_draft)
            k_step[acc:] = torch.randn(q - acc, H, D, generator=gen) * 50
            v_step[acc:] = torch.randn(q - acc, H, D, generator=gen) * 50
            rows.append(r)
            qs.append(q)
            keys.append(k_step)
            vals.append(v_step)
            accepted.append(acc)
        qsl = torch.tensor([0] + list(torch.tensor(qs).cumsum(0)), dtype=torch.int32)
        seq_lens = torch.tensor([r.done + q for r, q in zip(rows, qs, strict=True)], dtype=torch.int32)
        table = torch.tensor([r.blocks for r in rows], dtype=torch.int32)
        row_slot = torch.tensor([r.slot for r in rows], dtype=torch.int32)
        key, val = torch.cat(keys), torch.cat(vals)
        # Padding rows and tokens, as CUDA-graph batches have them.
        key = torch.cat([key, torch.randn(3, H, D, generator=gen)])
        val = torch.cat([val, torch.randn(3, H, D, generator=gen)])
        qsl = torch.cat([qsl, qsl[-1:]])
        seq_lens = torch.cat([seq_lens, torch.zeros(1, dtype=torch.int32)])
        table = torch.cat([table, torch.zeros(1, width, dtype=torch.int32)])
        row_slot = torch.cat([row_slot, torch.tensor([slots], dtype=torch.int32)])
        plan = plan_step(qsl, seq_lens, table, row_slot, frontier, key.shape[0], max(qs), fmt, slots, H, overflow,
                         spec)
        pool.pre(plan, cache)
        _check_state(plan, pool, cache, table, rows, fmt, commit_first=plan.commit_first)
        pool.post(plan, key, val, cache)
        for r, acc in zip(rows, accepted, strict=True):
            r.done += acc


def _check_state(plan, pool, cache, table, rows, fmt, commit_first):
    """At attention time the paged state holds each row's true history (sink, tiles, tail)."""
    g = fmt.group
    b = len(rows)
    hist = plan.hist[:b]
    if commit_first:
        return  # checked after post by the next step's pre-attention state
    state = PagedKV(fmt=fmt, cache=cache, block_table=table[:b, 1:].contiguous(), seq_lens=hist.clone(),
                    sink_k=pool.k, sink_v=pool.v, tail_k=pool.k, tail_v=pool.v,
                    dense_table=plan.dense_table[:b].contiguous())
    state.validate()
    for i, r in enumerate(rows):
        length = int(hist[i])
        assert length == r.done
        k_hist, v_hist = reference.gather_history(state, i)
        sink, n_tiles, tail = state.split_length(length)
        true_k = r.k[:length].transpose(0, 1)
        true_v = r.v[:length].transpose(0, 1)
        # 16-bit parts are exact; quantized tiles equal the reference quantization of the true tokens.
        torch.testing.assert_close(k_hist[:, :sink], true_k[:, :sink], rtol=0, atol=0)
        tail0 = g * (1 + n_tiles)
        torch.testing.assert_close(k_hist[:, tail0:], true_k[:, tail0:], rtol=0, atol=0)
        torch.testing.assert_close(v_hist[:, tail0:], true_v[:, tail0:], rtol=0, atol=0)
        if n_tiles:
            expected = fmt.allocate(n_tiles, H)
            starts = (g * (1 + torch.arange(n_tiles))).to(torch.int32)
            reference.quantize_into_cache_ref(r.k, r.v, starts, torch.arange(n_tiles, dtype=torch.int32),
                                              expected, fmt)
            got = cache[table[i, 1:1 + n_tiles].long()]
            assert torch.equal(got, expected), f"row {i}: quantized tiles differ from the true tokens' tiles"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_schedules_store_the_true_history(seed):
    _run(seed, spec=0)


@pytest.mark.parametrize("seed", [3, 4])
def test_speculation_never_quantizes_a_rejected_token(seed):
    _run(seed, spec=3)


def test_prefix_hit_continues_from_the_cached_tiles():
    _run(5, spec=0, prefix_hit=True)


def test_decode_commits_before_attention():
    fmt = _fmt()
    g = fmt.group
    StagingPool(fmt, 1, H, 0, torch.float32, "cpu")
    fmt.allocate(4, H)
    frontier = torch.zeros(2, dtype=torch.int32)
    frontier[0] = g
    table = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    plan = plan_step(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2 * g], dtype=torch.int32), table,
                     torch.tensor([0], dtype=torch.int32), frontier, 1, 1, fmt, 1, H, 0, 0)
    assert plan.commit_first and int(plan.hist[0]) == 2 * g
    # The step's token completes tile 1: it is quantized into block 1 in this step, the frontier moves on.
    assert plan.comp_blocks.tolist() == [1] and int(frontier[0]) == 2 * g
    assert plan.write1_slot.tolist() == [2] and plan.write1_off.tolist() == [g - 1]
