"""The CPU/dense backend: KVarN's paged-cache operations in plain PyTorch, which `ops` runs where the Triton
kernels do not (CPU tensors) and front-ends call to dequantize. Readable and slow (a Python loop over sequences);
the same math is the oracle the kernels are tested against (`reference`).
"""

from __future__ import annotations

import torch

from .codec import dequantize_tiles, quantize_tile_records
from .format import KVarNFormat
from .state import PagedKV


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
           operand_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact softmax attention of queries q [Hq, Lq, D] over keys and values k, v [H, Lk, D] in float32, GQA (query
    head h reads KV head h // (Hq / H)), bottom-right causal: query i sees keys j <= i + Lk - Lq. Returns float32
    [Hq, Lq, D].

    operand_dtype: keys, values and probabilities are rounded to it before their products (what a flash attention
    with 16-bit tensor-core operands computes): the precision floor kernels are judged against."""
    kf, vf = k.float(), v.float()
    if operand_dtype is not None:
        kf, vf = kf.to(operand_dtype).float(), vf.to(operand_dtype).float()
    rep = q.shape[0] // k.shape[0]
    kf, vf = kf.repeat_interleave(rep, dim=0), vf.repeat_interleave(rep, dim=0)
    lq, lk = q.shape[1], k.shape[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q.float() @ kf.transpose(1, 2)) * scale
    q_pos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    k_pos = torch.arange(lk, device=q.device)[None, :]
    probs = torch.softmax(scores.masked_fill(k_pos > q_pos, float("-inf")), dim=-1)
    if operand_dtype is not None:
        probs = probs.to(operand_dtype).float()
    return probs @ vf


# --- paged cache operations -----------------------------------------------------------------------
def quantize_into_cache(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    tile_starts: torch.Tensor,
    block_ids: torch.Tensor,
    cache: torch.Tensor,
    fmt: KVarNFormat,
    k_weights: torch.Tensor | None = None,
) -> None:
    """Quantize the G tokens of k_src/v_src [T, H, D] starting at each tile_starts[i] into cache[block_ids[i]];
    k_weights [N, H, D] (optional): tile i's channel weights of the K-frame choice (`choose_k_rotation`)."""
    if tile_starts.numel() == 0:
        return
    offs = tile_starts.long()[:, None] + torch.arange(fmt.group, device=k_src.device)
    k = k_src[offs].transpose(1, 2)  # [N, H, G, D]
    v = v_src[offs].transpose(1, 2)
    cache[block_ids.long()] = quantize_tile_records(k, v, fmt, k_weights=k_weights)


def gather_history(state: PagedKV, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The history of sequence b as float32 (k, v) [H, L, D] in the original frame."""
    fmt = state.fmt
    g = fmt.group
    length = int(state.seq_lens[b])
    sink_len, n_quant, tail_len = state.split_length(length)
    sink_block, tail_block = (int(x) for x in state.dense_table[b])
    ks = [state.sink_k[sink_block, :, :sink_len].float()]
    vs = [state.sink_v[sink_block, :, :sink_len].float()]
    if n_quant:
        blocks = state.block_table[b, :n_quant].long()
        k_q, v_q = dequantize_tiles(state.cache[blocks], fmt)  # [n, H, G, D]
        ks.append(k_q.transpose(0, 1).reshape(k_q.shape[1], n_quant * g, -1))
        vs.append(v_q.transpose(0, 1).reshape(v_q.shape[1], n_quant * g, -1))
    ks.append(state.tail_k[tail_block, :, :tail_len].float())
    vs.append(state.tail_v[tail_block, :, :tail_len].float())
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def paged_attention(
    q: torch.Tensor,
    state: PagedKV,
    cu_seqlens_q: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of varlen queries q [Tq, Hq, D] over each sequence's history plus its new 16-bit tokens.

    Keys are the history (sink + quantized tiles + tail) followed by the new 16-bit tokens k_new/v_new
    [Tk, H, D]; the mask is causal over that sequence with the last query aligned to the last key
    (bottom-right). Returns [Tq, Hq, D] in q.dtype.
    """
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if q1 == q0:
            continue
        k_hist, v_hist = gather_history(state, b)
        if k_new is not None:
            k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            k_all = torch.cat([k_hist, k_new[k0:k1].transpose(0, 1).float()], dim=1)
            v_all = torch.cat([v_hist, v_new[k0:k1].transpose(0, 1).float()], dim=1)
        else:
            k_all, v_all = k_hist, v_hist
        out[q0:q1] = attend(q[q0:q1].transpose(0, 1), k_all, v_all, scale).transpose(0, 1).to(q.dtype)
    return out

