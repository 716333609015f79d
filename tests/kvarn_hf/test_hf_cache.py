"""KVarNCache at the cache level, fed synthetic K/V: layout against the kernel-core reference, padding, batch edits."""

from __future__ import annotations

import pytest
import torch
from hf_models import GROUP, PRESET
from transformers import LlamaConfig

from kvarn_hf import KVarNCache
from kvarn_hf import layer as layer_module
from kvarn_hf import placement as placement_module
from kvarn_kernels import KVarNFormat
from kvarn_kernels.reference import (
    dequantize_tiles,
    gather_history,
    paged_attention_ref,
    quantize_tile_records,
    synthetic_kv,
)
from kvarn_kernels.reference import sink_query_weights as ref_sink_query_weights

HEADS, DIM, LAYERS = 2, 64, 2
G = GROUP


def kv(length: int, seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, H, length, D] float32 keys/values with outlier channels."""
    pairs = [synthetic_kv(length, HEADS, DIM, torch.float32, seed=seed + b) for b in range(batch)]
    k = torch.stack([p[0] for p in pairs]).transpose(1, 2).contiguous()
    v = torch.stack([p[1] for p in pairs]).transpose(1, 2).contiguous()
    return k, v


def feed(cache: KVarNCache, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """update() every layer with the same k/v (layer l gets k + l, so layers differ); returns what update gave."""
    return [cache.update(k + layer, v - layer, layer) for layer in range(LAYERS)]


def expected_history(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's history [H, L, D] as KVarN must store it: 16-bit sink and tail, tiles as the reference quantizes."""
    fmt = KVarNFormat.from_preset(PRESET, DIM, k.dtype)
    length = k.shape[1]
    n_tiles = max(length - G, 0) // G
    k, v = k.clone(), v.clone()
    if n_tiles:
        span = slice(G, G * (1 + n_tiles))
        tiles_k = k[:, span].reshape(HEADS, n_tiles, G, DIM).transpose(0, 1)
        tiles_v = v[:, span].reshape(HEADS, n_tiles, G, DIM).transpose(0, 1)
        k_hat, v_hat = dequantize_tiles(quantize_tile_records(tiles_k, tiles_v, fmt), fmt)
        k[:, span] = k_hat.transpose(0, 1).reshape(HEADS, -1, DIM)
        v[:, span] = v_hat.transpose(0, 1).reshape(HEADS, -1, DIM)
    return k, v


def assert_rows(cache: KVarNCache, rows_k: list[torch.Tensor], rows_v: list[torch.Tensor]) -> None:
    """Every layer's stored history of row b equals expected_history of the given row tokens."""
    for layer in range(LAYERS):
        state = cache.layers[layer].paged_state()
        state.check_tables()  # lengths, block ids and sink/tail ids the kernels would read are all in range
        for b, (k, v) in enumerate(zip(rows_k, rows_v, strict=True)):
            got_k, got_v = gather_history(state, b)
            want_k, want_v = expected_history(k + layer, v - layer)
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [[100, 1, 27, 64, 1, 130, 5], [1] * 140, [300]])
def test_history_matches_kernel_reference(chunks):
    """Sink and tail hold the exact tokens, every full tile the kernel-core reference quantization of its tokens."""
    cache = KVarNCache(PRESET)
    k, v = kv(sum(chunks), seed=1, batch=2)
    pos = 0
    for n in chunks:
        feed(cache, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
        assert cache.get_seq_length() == pos
        assert_rows(cache, list(k[:, :, :pos]), list(v[:, :, :pos]))


def test_each_tile_quantized_once_in_one_call_per_update(monkeypatch):
    calls: list[int] = []
    real = layer_module.ops.quantize_into_cache

    def counting(k_src, v_src, tile_starts, block_ids, cache, fmt, k_weights=None):
        calls.append(tile_starts.numel())
        real(k_src, v_src, tile_starts, block_ids, cache, fmt, k_weights)

    monkeypatch.setattr(layer_module.ops, "quantize_into_cache", counting)
    cache = KVarNCache(PRESET)
    k, v = kv(400, seed=2, batch=2)
    for pos, n in ((0, 150), (150, 1), (151, 99), (250, 150)):
        before = len(calls)
        feed(cache, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        assert len(calls) - before <= LAYERS  # at most one quantize call per layer per update
    # 400 tokens = sink + 5 full tiles + 16-token tail, per row and layer: each tile exactly once
    assert sum(calls) == LAYERS * 2 * ((400 - G) // G)


def test_dense_update_returns_stored_history_then_new_tokens():
    cache = KVarNCache(PRESET)
    k, v = kv(200, seed=3, batch=2)
    feed(cache, k[:, :, :150], v[:, :, :150])
    out_k, out_v = cache.update(k[:, :, 150:], v[:, :, 150:], 0)
    for b in range(2):
        want_k, want_v = expected_history(k[b, :, :150], v[b, :, :150])
        torch.testing.assert_close(out_k[b], torch.cat([want_k, k[b, :, 150:]], 1), rtol=0, atol=0)
        torch.testing.assert_close(out_v[b], torch.cat([want_v, v[b, :, 150:]], 1), rtol=0, atol=0)


def fused_cache() -> KVarNCache:
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=HEADS, head_dim=DIM,
                         num_hidden_layers=LAYERS)
    config._attn_implementation = "kvarn"
    cache = KVarNCache(PRESET, config=config)
    assert cache.fused
    return cache


def causal_attention(q, k, v, scale):
    """q [B, Hq, T, D] over k/v [B, H, L, D], the last query aligned with the last key."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    t, length = q.shape[2], k.shape[2]
    hidden = torch.arange(length)[None, :] > torch.arange(t)[:, None] + (length - t)
    return (scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def test_fused_attend_matches_attention_over_the_dense_history():
    """Fused mode: update() defers; attend() gives attention over stored history + new 16-bit tokens, then appends."""
    fused, dense = fused_cache(), KVarNCache(PRESET)
    k, v = kv(330, seed=4, batch=2)
    q = torch.randn(2, 4, 330, DIM, generator=torch.Generator().manual_seed(0))
    pos = 0
    for n in (150, 1, 40, 1, 138):
        sl = slice(pos, pos + n)
        for layer in range(LAYERS):
            pending, same = fused.update(k[:, :, sl] + layer, v[:, :, sl], layer)
            assert pending is same and fused.get_seq_length(layer) == pos + n
            out = fused.layers[layer].attend(q[:, :, sl], pending, 0.125, None)
            keys, values = dense.update(k[:, :, sl] + layer, v[:, :, sl], layer)
            torch.testing.assert_close(out, causal_attention(q[:, :, sl], keys, values, 0.125), rtol=1e-5, atol=1e-5)
        pos += n
    for layer in range(LAYERS):
        for b in range(2):
            a, s = gather_history(fused.layers[layer].paged_state(), b), gather_history(
                dense.layers[layer].paged_state(), b)
            torch.testing.assert_close(a, s, rtol=0, atol=0)


def test_unpadded_prefill_takes_sdpa_and_equals_the_paged_kernel(monkeypatch):
    """A fused prefill with no history and no padding is plain causal attention over its own tokens (torch SDPA);
    the paged kernel computes the same thing (its 16-bit path), and both store the same tiles."""
    k, v = kv(300, seed=7, batch=2)
    q = torch.randn(2, 4, 300, DIM, generator=torch.Generator().manual_seed(1))
    outs, states = [], []
    real = layer_module.ops.paged_attention
    for use_sdpa in (True, False):
        monkeypatch.setattr(layer_module, "PREFILL_SDPA", use_sdpa)
        calls: list[int] = []

        def counted(*args, calls=calls, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(layer_module.ops, "paged_attention", counted)
        cache = fused_cache()
        pending, _ = cache.update(k, v, 0)
        outs.append(cache.layers[0].attend(q, pending, 0.125, None))
        states.append(gather_history(cache.layers[0].paged_state(), 1))
        assert bool(calls) != use_sdpa
        pending, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)  # the next step has history: the paged kernel
        cache.layers[0].attend(q[:, :, :1], pending, 0.125, None)
        assert calls
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)


def test_fused_update_without_kvarn_attention_is_refused():
    cache = fused_cache()
    k, v = kv(10, seed=5)
    cache.update(k, v, 0)
    with pytest.raises(RuntimeError, match="attn_implementation='kvarn'"):
        cache.update(k, v, 0)


@pytest.mark.parametrize("fused", [False, True])
def test_left_padding_never_enters_tiles(fused):
    """A padded row stores exactly what the same tokens alone would: tiles start at the row's first real token."""
    pads = [0, 5, 70]  # 70 > G: a whole tile's worth of padding
    total = 260
    k, v = kv(total, seed=6, batch=3)
    mask = (torch.arange(total)[None, :] >= torch.tensor(pads)[:, None]).long()
    cache = fused_cache() if fused else KVarNCache(PRESET)
    if not fused:
        cache.set_padding(mask)
    q = torch.randn(3, 4, total, DIM)
    pos = 0
    for n in (100, 1, 90, 69):
        sl = slice(pos, pos + n)
        for layer in range(LAYERS):
            if fused:
                pending, _ = cache.update(k[:, :, sl] + layer, v[:, :, sl] - layer, layer)
                out = cache.layers[layer].attend(q[:, :, sl], pending, 0.125, mask[:, : pos + n])
                assert torch.isfinite(out).all()
            else:
                keys, _ = cache.update(k[:, :, sl] + layer, v[:, :, sl] - layer, layer)
                for b, p in enumerate(pads):  # stored padding comes back as zeros (the model's mask hides it)
                    assert not keys[b, :, : min(p, pos)].any()
        pos += n
    assert_rows(cache, [k[b, :, p:] for b, p in enumerate(pads)], [v[b, :, p:] for b, p in enumerate(pads)])


def test_padding_after_first_real_token_is_refused():
    cache = KVarNCache(PRESET)
    with pytest.raises(ValueError, match="left padding only"):
        cache.set_padding(torch.tensor([[1, 1, 0, 1]]))


def filled(
    length: int, chunks: tuple[int, ...], seed: int = 7, keep_last_tile: bool = True
) -> tuple[KVarNCache, torch.Tensor, torch.Tensor]:
    cache = KVarNCache(PRESET, keep_last_tile=keep_last_tile)
    k, v = kv(length, seed=seed, batch=2)
    pos = 0
    for n in chunks:
        feed(cache, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
    assert pos == length
    return cache, k, v


def test_crop_inside_the_tail_is_exact():
    cache, k, v = filled(150, (100, 50))
    cache.crop(-3)
    assert cache.get_seq_length() == 147
    assert_rows(cache, list(k[:, :, :147]), list(v[:, :, :147]))
    feed(cache, k[:, :, 147:150], v[:, :, 147:150])  # the cache keeps working after a crop
    assert_rows(cache, list(k[:, :, :150]), list(v[:, :, :150]))


def test_crop_reopens_the_newest_tile_exactly():
    """124 tokens (tail 60) + 10 completes tile 0; crop(-8) puts its 16-bit tokens back: as if never quantized."""
    cache, k, v = filled(134, (124, 10))
    cache.crop(-8)
    assert_rows(cache, list(k[:, :, :126]), list(v[:, :, :126]))
    feed(cache, k[:, :, 126:134], v[:, :, 126:134])
    assert_rows(cache, list(k[:, :, :134]), list(v[:, :, :134]))
    feed(cache, *kv(1, seed=11, batch=2))  # a later step that completes no tile
    cache.crop(-10)  # reopens tile 0 again
    assert_rows(cache, list(k[:, :, :125]), list(v[:, :, :125]))


def test_without_the_last_tile_copy_crop_stays_in_16bit():
    cache, k, v = filled(134, (124, 10), keep_last_tile=False)
    assert not cache.is_croppable
    cache.crop(-5)  # inside the 6-token tail
    assert_rows(cache, list(k[:, :, :129]), list(v[:, :, :129]))
    with pytest.raises(ValueError, match="keep_last_tile=True"):
        cache.crop(-2)  # would reopen tile 0


def test_crop_to_a_tile_boundary_needs_no_16bit_copy():
    cache, k, v = filled(200, (134, 1, 65), keep_last_tile=False)
    cache.crop(-72)  # 128 = sink + one full tile, tail empty
    assert_rows(cache, list(k[:, :, :128]), list(v[:, :, :128]))


def test_crop_into_older_quantized_history_is_refused():
    cache, k, v = filled(300, (300,))  # sink, tiles 0-2, tail of 44
    with pytest.raises(ValueError, match="16-bit copy"):
        cache.crop(-(44 + G + 1))  # would reopen tile 1; only tile 2 has a 16-bit copy
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(100)


def test_reorder_select_repeat_move_whole_rows():
    cache, k, v = filled(200, (150, 50))
    cache.reorder_cache(torch.tensor([1, 1]))
    assert_rows(cache, [k[1, :, :200]] * 2, [v[1, :, :200]] * 2)
    cache, k, v = filled(200, (150, 50))
    cache.batch_repeat_interleave(2)
    assert_rows(cache, [k[0], k[0], k[1], k[1]], [v[0], v[0], v[1], v[1]])
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert_rows(cache, [k[1], k[0]], [v[1], v[0]])
    more_k, more_v = kv(70, seed=8, batch=2)  # then keep appending to the new batch
    feed(cache, more_k, more_v)
    assert_rows(cache, [torch.cat([k[1], more_k[0]], 1), torch.cat([k[0], more_k[1]], 1)],
                [torch.cat([v[1], more_v[0]], 1), torch.cat([v[0], more_v[1]], 1)])


def test_reset_empties_the_cache_for_a_new_batch():
    cache, _, _ = filled(200, (200,))
    cache.reset()
    assert cache.get_seq_length() == 0
    k, v = kv(130, seed=9, batch=3)
    feed(cache, k, v)
    assert_rows(cache, list(k), list(v))


def test_memory_is_the_format_size():
    cache, _, _ = filled(1000, (1000,), keep_last_tile=False)
    fmt = KVarNFormat.from_preset(PRESET, DIM, torch.float32)
    tiles = (1000 - G) // G
    mem = cache.memory_bytes()
    assert mem["tiles_used"] == LAYERS * 2 * tiles * HEADS * fmt.record_bytes
    assert mem["tiles_allocated"] >= mem["tiles_used"]
    # 16-bit blocks per layer: sink + tail for each row (float32 here), K and V
    assert mem["dense"] == LAYERS * 2 * 2 * HEADS * G * DIM * 4 * 2
    cache.reserve(4000)
    assert cache.memory_bytes()["tiles_allocated"] == LAYERS * 2 * ((4000 - G) // G) * HEADS * fmt.record_bytes


def test_unsupported_shapes_and_presets_are_refused():
    with pytest.raises(ValueError, match="preset 'k3v3' is unknown"):
        KVarNCache("k3v3")
    k = torch.zeros(1, 2, 4, 80)
    with pytest.raises(ValueError, match="head_dim 80 is not supported"):
        KVarNCache(PRESET).update(k, k, 0)
    with pytest.raises(ValueError, match="one shape"):
        KVarNCache(PRESET).update(torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4, 128), 0)


def test_reference_attention_over_the_cache_state():
    """The layer's PagedKV is what the kernel core's reference attention reads (decode over the whole history)."""
    cache, k, v = filled(300, (300,))
    state = cache.layers[0].paged_state()
    q = torch.randn(2, 4, DIM)
    out = paged_attention_ref(q, state, torch.arange(3, dtype=torch.int32))
    keys, values = (torch.stack(x) for x in zip(*(expected_history(k[b], v[b]) for b in range(2)), strict=True))
    want = causal_attention(q[:, :, None], keys, values, DIM**-0.5)[:, 0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [64, 128])
def test_decode_placement_fast_path_equals_the_general_placement(group):
    """The one-token decode placement (Python ints) must produce exactly what `placement` does, and decline every
    step where a row completes a tile or its new position is still padding."""
    gen = torch.Generator().manual_seed(group)
    declined = taken = 0
    for _ in range(40):
        batch = int(torch.randint(1, 6, (1,), generator=gen))
        pads = torch.randint(0, 3 * group, (batch,), generator=gen)
        for from_len in list(range(0, 4 * group + 2, 7)) + [2 * group - 1, 3 * group - 1, 4 * group - 1]:
            general, new_tiles, nq1 = placement_module.placement(pads, from_len, 1, group, next_block=5)
            fast = placement_module.decode_placement(pads.tolist(), from_len, group)
            if fast is None:
                declined += 1
                assert int(new_tiles.sum()) > 0 or "real_index" in general
                continue
            taken += 1
            parts, fast_tiles, fast_nq1 = fast
            assert torch.equal(fast_tiles, new_tiles) and torch.equal(fast_nq1, nq1)
            assert set(parts) == set(general)
            for key, value in general.items():
                assert torch.equal(parts[key], value.long()), key
    assert declined and taken


def _records_of_row(layer, b: int, n_tiles: int) -> torch.Tensor:
    blocks = layer.paging.block_table[b, :n_tiles].long()
    return layer.tiles[blocks]


def test_sink_query_k_frame_weighs_each_row_by_its_own_sink_queries():
    """k_frame='sink-queries': every tile of a row is quantized with the K-frame weights of that row's sink queries
    (`reference.sink_query_weights` of its first G real tokens' queries), also after a left-padded start and a
    batch reorder; the weights change some frames against the tile-only rule."""
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=HEADS, head_dim=DIM,
                         num_hidden_layers=LAYERS)
    config._attn_implementation = "kvarn"
    cache = KVarNCache(PRESET, config=config, k_frame="sink-queries")
    k, v = kv(600, seed=5, batch=2)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 600, DIM, generator=gen)
    q[..., :3] *= 8  # a few loud query channels: the weights matter
    pad = 40  # row 1 is left-padded: its sink is its first G real tokens
    padding = torch.ones(2, 600, dtype=torch.long)
    padding[1, :pad] = 0
    pos = 0
    for n in (300, 1, 99):
        for layer in range(LAYERS):
            pending, _ = cache.update(k[:, :, pos : pos + n] + layer, v[:, :, pos : pos + n], layer)
            cache.layers[layer].attend(q[:, :, pos : pos + n], pending, 0.125, padding[:, : pos + n])
        pos += n
    cache.reorder_cache(torch.tensor([1, 0]))  # rows swap: each keeps its own sink energies
    k, v, q, padding = k.flip(0), v.flip(0), q.flip(0), padding.flip(0)
    for n in (200,):
        for layer in range(LAYERS):
            pending, _ = cache.update(k[:, :, pos : pos + n] + layer, v[:, :, pos : pos + n], layer)
            cache.layers[layer].attend(q[:, :, pos : pos + n], pending, 0.125, padding[:, : pos + n])
        pos += n
    fmt = KVarNFormat.from_preset(PRESET, DIM, torch.float32)
    changed = 0
    for layer in range(LAYERS):
        lay = cache.layers[layer]
        for b in range(2):
            start = int((padding[b] == 0).sum())
            real_k = (k[b, :, start:pos] + layer)
            real_v = v[b, :, start:pos]
            n_tiles = (real_k.shape[1] - G) // G
            tiles_k = real_k[:, G : G * (1 + n_tiles)].reshape(HEADS, n_tiles, G, DIM).transpose(0, 1)
            tiles_v = real_v[:, G : G * (1 + n_tiles)].reshape(HEADS, n_tiles, G, DIM).transpose(0, 1)
            w = ref_sink_query_weights(q[b, :, start : start + G], HEADS)  # [H, D]
            weights = w.expand(n_tiles, HEADS, DIM).contiguous()
            want = quantize_tile_records(tiles_k, tiles_v, fmt, k_weights=weights)
            got = _records_of_row(lay, b, n_tiles)
            assert torch.equal(got, want)
            plain = quantize_tile_records(tiles_k, tiles_v, fmt)
            changed += int((fmt.split(plain)[1][..., 2 * DIM].signbit() != fmt.split(got)[1][..., 2 * DIM].signbit())
                           .sum())
    assert changed > 0


def test_sink_query_k_frame_needs_the_fused_path():
    cache = KVarNCache(PRESET, k_frame="sink-queries")
    k, v = kv(10, seed=1)
    with pytest.raises(ValueError, match="only the fused path sees"):
        cache.update(k, v, 0)
    with pytest.raises(ValueError, match="k_frame 'tile' is unknown"):
        KVarNCache(PRESET, k_frame="tile")


def test_crop_undoes_a_verification_forward_that_completed_several_tiles():
    """bind(verify_from=124): one forward of 150 draft tokens completes three tiles (124 -> 274 real tokens per row);
    crop can undo it back into the first of them, and the blocks of the dropped tiles are handed out again."""
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=HEADS, head_dim=DIM,
                         num_hidden_layers=LAYERS)
    cache = KVarNCache(PRESET, config=config)
    cache.bind(config, verify_from=124)
    k, v = kv(274, seed=7, batch=2)
    feed(cache, k[:, :, :124], v[:, :, :124])
    feed(cache, k[:, :, 124:], v[:, :, 124:])
    assert cache._paging.next_block == 2 * 3
    cache.crop(-140)  # 134 tokens: sink, tile 0 and 6 tokens of the reopened tile 1
    assert_rows(cache, list(k[:, :, :134]), list(v[:, :, :134]))
    record = KVarNFormat.from_preset(PRESET, DIM, torch.float32).record_bytes
    assert cache.memory_bytes()["tiles_used"] == LAYERS * 2 * 1 * HEADS * record  # one tile per row still used
    feed(cache, k[:, :, 134:274], v[:, :, 134:274])
    assert_rows(cache, list(k[:, :, :274]), list(v[:, :, :274]))
    assert cache._paging.next_block == 2 * 3  # tiles 1 and 2 of each row reused the blocks the crop freed
    cache.crop(-139)  # 135: reopens tile 1, the first tile of the latest forward
    assert_rows(cache, list(k[:, :, :135]), list(v[:, :, :135]))
    feed(cache, k[:, :, 135:274], v[:, :, 135:274])
    with pytest.raises(ValueError, match="16-bit copy"):
        cache.crop(-150)  # 124: would reopen tile 0, completed by an earlier forward
    cache.crop(-146)  # 128: a tile boundary needs no copy


def visible_attention(q, k, v, visible, scale=0.125):
    """q [B, Hq, T, D] over k/v [B, H, L, D] where visible [B, T, L] (True = attend); returns [B, T, Hq, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_a_verification_forward_attends_like_one_token_decoding(fused):
    """bind(verify_from=P) (speculative decoding): a forward of many tokens past the prompt gives each of them the
    attention of one-token decoding (tiles completed before it quantized, everything else 16-bit), on rows whose
    tiles complete at different positions (left padding 0 and 37), whether the prompt is a forward of its own or
    part of the same forward; the stored tiles are the same bit for bit. Fused: `attend` runs the forward in parts.
    Dense: `update` returns the extended keys that `verification_mask` selects from."""
    pads, prompt, total = torch.tensor([0, 37]), 150, 280  # tiles end at 191 and 255 (row 0), 164 and 228 (row 1)
    k, v = kv(total, seed=12, batch=2)
    q = torch.randn(2, 4, total, DIM, generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(total)[None, :] >= pads[:, None]).long()
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=HEADS, head_dim=DIM,
                         num_hidden_layers=LAYERS)
    config._attn_implementation = "kvarn" if fused else "sdpa"

    def forward(cache, start, end):
        """Attention outputs [B, end - start, Hq, D] of every layer for positions start..end-1."""
        sl = slice(start, end)
        visible = None if fused else cache.verification_mask(config, torch.zeros(2, end - start, 1), 0)
        outs = []
        for layer in range(LAYERS):
            keys, values = cache.update(k[:, :, sl] + layer, v[:, :, sl] - layer, layer)
            if fused:
                outs.append(cache.layers[layer].attend(q[:, :, sl], keys, 0.125, mask[:, :end]))
                continue
            if visible is None:  # the plain causal mask over [history | new], padding hidden
                kv_pos = torch.arange(keys.shape[2])
                plain = (kv_pos[None, None, :] <= torch.arange(start, end)[None, :, None]) & (
                    kv_pos[None, None, :] >= pads[:, None, None])
                outs.append(visible_attention(q[:, :, sl], keys, values, plain))
            else:
                outs.append(visible_attention(q[:, :, sl], keys, values, visible[:, 0]))
        return torch.stack(outs)

    plain = KVarNCache(PRESET, config=config)
    plain.set_padding(mask)
    want = torch.cat([forward(plain, 0, prompt)] + [forward(plain, p, p + 1) for p in range(prompt, total)], dim=2)
    real = mask.bool()[:, None, :, None, None].transpose(0, 1)  # [1, B, T, 1, 1]: compare real query positions
    for split in (True, False):
        cache = KVarNCache(PRESET, config=config)
        cache.bind(config, mask, verify_from=prompt)
        got = (torch.cat([forward(cache, 0, prompt), forward(cache, prompt, total)], dim=2) if split
               else forward(cache, 0, total))
        torch.testing.assert_close(got.where(real, 0), want.where(real, 0), rtol=1e-5, atol=1e-5)
        for layer in range(LAYERS):
            for b in range(2):
                a = gather_history(cache.layers[layer].paged_state(), b)
                s = gather_history(plain.layers[layer].paged_state(), b)
                torch.testing.assert_close(a, s, rtol=0, atol=0)
    # Without verify_from the same forward attends as one step: the tiles it completes stay 16-bit for it.
    cache = KVarNCache(PRESET, config=config)
    cache.bind(config, mask)
    one_step = torch.cat([forward(cache, 0, prompt), forward(cache, prompt, total)], dim=2)
    assert float((one_step - want).where(real, 0).abs().max()) > 1e-3
