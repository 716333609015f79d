"""The backend's layer step (builder + impl) over a shuffled paged cache, against the kernel core's reference of the
same history — the idea of vLLM's `tests/v1/attention/test_attention_backends.py`, with the cache filled through
the backend itself. Chunked prefill, decode, mixed batches and prefix-hit starts; CPU (reference kernels) and GPU."""

from __future__ import annotations

import json
import random

import pytest
import torch

vllm = pytest.importorskip("vllm")
if not vllm.__version__.startswith("0.22."):
    pytest.skip(f"targets vLLM 0.22, found {vllm.__version__}", allow_module_level=True)

import vllm.platforms  # noqa: E402

if not torch.cuda.is_available():
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()

from kvarn_kernels import KVarNFormat, reference  # noqa: E402
from kvarn_kernels.state import build_paged_kv  # noqa: E402
from kvarn_vllm import register, runtime  # noqa: E402

register()

from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import TQFullAttentionSpec  # noqa: E402

from kvarn_vllm.backend import KVarNAttentionBackend, KVarNAttentionImpl, KVarNMetadataBuilder  # noqa: E402

HQ, HKV = 4, 2


class _Layer:
    layer_name = "model.layers.0.self_attn.attn"


def _setup(tmp_path, preset: str, head_dim: int, dtype: torch.dtype, device: str):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HQ * head_dim,
              "intermediate_size": 256, "num_attention_heads": HQ, "num_key_value_heads": HKV, "head_dim": head_dim,
              "num_hidden_layers": 1, "vocab_size": 1000, "max_position_embeddings": 4096,
              "torch_dtype": str(dtype).replace("torch.", "")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, load_format="dummy", kv_cache_dtype=preset,
                     max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=2048,
                     dtype=str(dtype).replace("torch.", "")).create_engine_config()
    fmt = KVarNFormat.from_preset(preset, head_dim, dtype)
    spec = TQFullAttentionSpec(block_size=fmt.group, num_kv_heads=HKV, head_size=head_dim, head_size_v=head_dim,
                               dtype=torch.uint8, tq_slot_size=fmt.slot_bytes)
    return cfg, fmt, spec


class _Harness:
    """One KVarN layer (builder + impl) over a shuffled paged cache, fed the true K/V of some requests step by step,
    with the reference's output for the same history beside each step's output."""

    def __init__(self, tmp_path, device, preset, head_dim, dtype, lengths, seed=0):
        runtime._RUNTIME = None
        cfg, self.fmt, spec = _setup(tmp_path, preset, head_dim, dtype, device)
        self.device, self.dtype, self.head_dim, self.lengths = device, dtype, head_dim, lengths
        self.gen = torch.Generator().manual_seed(seed)
        with set_current_vllm_config(cfg):
            self.builder = KVarNMetadataBuilder(spec, [_Layer.layer_name], cfg, torch.device(device))
            self.impl = KVarNAttentionImpl(HQ, head_dim, head_dim**-0.5, HKV, kv_cache_dtype=preset)
        self.rt = runtime.get_runtime()
        width = 12
        perm = torch.randperm(4 * width + 3, generator=self.gen)
        # The page vLLM allocates (its rows wider than a record at head_dim 96 with 128-token tiles).
        shape = KVarNAttentionBackend.get_kv_cache_shape(4 * width + 3, self.fmt.group, HKV, head_dim, preset)
        self.kv_cache = torch.zeros(shape, dtype=torch.uint8, device=device)
        self.true_k = [torch.randn(n, HKV, head_dim, generator=self.gen).to(dtype) for n in lengths]
        self.true_v = [torch.randn(n, HKV, head_dim, generator=self.gen).to(dtype) for n in lengths]
        self.tables = [perm[i * width:(i + 1) * width].tolist() for i in range(len(lengths))]
        self.done = [0] * len(lengths)
        for i in range(len(lengths)):
            self.rt.slots.assign(f"r{i}", 0, self.tables[i][0], set())
        # Warm-up (vLLM's profiling call: no metadata) allocates the staging pool.
        self.layer = _Layer()
        q0 = torch.zeros(1, HQ * head_dim, dtype=dtype, device=device)
        self.impl.forward(self.layer, q0, q0[:, : HKV * head_dim], q0[:, : HKV * head_dim], self.kv_cache, None)

    def step(self, rows, qs, check=True, fused_v=False):
        """One step: rows[j] gets qs[j] new tokens. Returns (output, reference or None unless check,
        query_start_loc). fused_v: V is handed over as a view of a fused QKV output and K as a tensor of its own, as
        a compiled model does (different strides)."""
        done, dev, fmt = self.done, self.device, self.fmt
        b = len(rows)
        self.rt.slots.row_slot[:b] = torch.tensor([self.rt.slots.req_slot[f"r{i}"] for i in rows], dtype=torch.int32)
        self.rt.slots.row_slot[b:] = self.rt.num_slots
        qsl = torch.tensor([0] + list(torch.tensor(qs).cumsum(0).tolist()), dtype=torch.int32)
        seq = torch.tensor([done[i] + q for i, q in zip(rows, qs, strict=True)], dtype=torch.int32)
        table = torch.tensor([self.tables[i] for i in rows], dtype=torch.int32)
        n_tok = int(qsl[-1])
        cam = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq.to(dev), num_reqs=b,
            num_actual_tokens=n_tok, max_query_len=max(qs), max_seq_len=int(seq.max()),
            block_table_tensor=table.to(dev), slot_mapping=torch.zeros(n_tok, dtype=torch.int64, device=dev))
        meta = self.builder.build(0, cam)
        k = torch.cat([self.true_k[i][done[i]:done[i] + q] for i, q in zip(rows, qs, strict=True)]).to(dev)
        v = torch.cat([self.true_v[i][done[i]:done[i] + q] for i, q in zip(rows, qs, strict=True)]).to(dev)
        q = torch.randn(n_tok, HQ, self.head_dim, generator=self.gen).to(self.dtype).to(dev)
        v_in = v.view(n_tok, -1)
        if fused_v:
            v_in = torch.cat([q.view(n_tok, -1), k.view(n_tok, -1), v_in], 1)[:, -v_in.shape[1]:]
        out = self.impl.forward(self.layer, q.view(n_tok, -1), k.view(n_tok, -1), v_in, self.kv_cache, meta)
        out = out.view(n_tok, HQ, self.head_dim).float().cpu()
        if not check:
            for i, qn in zip(rows, qs, strict=True):
                done[i] += qn
            return out, None, qsl
        # The reference: the same history quantized by the reference quantizer, attended by the reference.
        commit_first = max(qs) == 1
        hist = [done[i] + (q if commit_first else 0) for i, q in zip(rows, qs, strict=True)]
        state = build_paged_kv([self.true_k[i][:h] for i, h in zip(rows, hist, strict=True)],
                               [self.true_v[i][:h] for i, h in zip(rows, hist, strict=True)], fmt,
                               reference.quantize_into_cache_ref, generator=torch.Generator().manual_seed(1)) \
            if min(hist) > 0 else None
        if commit_first:
            expected = reference.paged_attention_ref(q.cpu(), state, qsl)
        elif state is not None:
            expected = reference.paged_attention_ref(q.cpu(), state, qsl, k.cpu(), v.cpu(), qsl)
        else:
            expected = _causal(q.cpu(), k.cpu(), v.cpu(), [done[i] for i in rows], qsl, self.true_k, self.true_v,
                               rows, fmt)
        for i, qn in zip(rows, qs, strict=True):
            done[i] += qn
        return out, expected.float(), qsl


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("preset", "head_dim", "dtype"), [
    ("kvarn_k4v2_g64", 64, torch.bfloat16),
    pytest.param("kvarn_k4v2_g128", 128, torch.float16, marks=pytest.mark.gpu),
    # head_dim 96 (Phi-3-mini): 10560-byte records in 10624-byte page rows (whole bytes per token); 12 s on a CPU,
    # where the kernel-core tests cover such rows.
    pytest.param("kvarn_k4v2_g128", 96, torch.bfloat16, marks=pytest.mark.gpu),
])
def test_backend_steps_attend_like_the_reference(tmp_path, device, preset, head_dim, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    g = KVarNFormat.from_preset(preset, head_dim).group
    h = _Harness(tmp_path, device, preset, head_dim, dtype, [5 * g + 17, 3 * g + 1, 2 * g - 3])
    rnd = random.Random(0)
    steps = 0
    while any(d < n for d, n in zip(h.done, h.lengths, strict=True)) and steps < 60:
        steps += 1
        rows = [i for i in range(len(h.lengths)) if h.done[i] < h.lengths[i]]
        qs = []
        for i in rows:
            left = h.lengths[i] - h.done[i]
            qs.append(1 if (h.done[i] > 0 and rnd.random() < 0.6) else min(left, rnd.choice([1, 40, g + 9, 3 * g])))
        out, expected, _ = h.step(rows, qs)
        tol = 2e-2 if device == "cuda" else 1e-3
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert all(d == n for d, n in zip(h.done, h.lengths, strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_k_and_v_with_different_strides(tmp_path, device, monkeypatch):
    """A compiled vLLM model (CUDA graphs on) hands the backend K as its own tensor and V as a view of the fused QKV
    output; the GPU kernels take one stride pair for both and refused such a step. Every kernel call must see equal
    strides, and the outputs must match the reference."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from kvarn_kernels import ops

    seen = []
    for name in ("paged_attention", "quantize_into_cache"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kw):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[-1] == 64]
            if _name == "quantize_into_cache":
                tensors = tensors[:2]
            else:
                tensors = tensors[1:3]  # k_new, v_new after q
            if len(tensors) == 2:
                seen.append(tensors[0].stride() == tensors[1].stride())
            return _real(*args, **kw)

        monkeypatch.setattr(ops, name, spy)
    g = 64
    h = _Harness(tmp_path, device, "kvarn_k4v2_g64", 64, torch.bfloat16, [2 * g + 10, g + 3])
    tol = 2e-2 if device == "cuda" else 1e-3
    for rows, qs in (([0, 1], [g + 40, g + 3]), ([0], [g - 31]), ([0], [1])):
        out, expected, _ = h.step(rows, qs, fused_v=True)
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert seen and all(seen)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_one_request_does_not_reach_another(tmp_path, device, bad):
    """Request 0's keys and values hold a non-finite value in its sink, in a tile quantized inside a prefill chunk
    and in a tile completed by decode steps; request 1, batched with it in every step (prefill chunks, decode), still
    gets exactly the reference's output of its own history, and nothing raises."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    preset, head_dim, dtype = "kvarn_k4v2_g64", 64, torch.bfloat16
    g = 64
    n = 3 * g + 4
    h = _Harness(tmp_path, device, preset, head_dim, dtype, [n, n])
    for t, head, d in ((5, 0, 3), (g + 7, 1, 10), (2 * g + 30, 0, 0)):
        h.true_k[0][t, head, d] = bad
        h.true_v[0][t + 1, head, d] = bad
    tol = 2e-2 if device == "cuda" else 1e-3
    # A prefill chunk that completes tiles 0 and 1, then decode steps that complete tile 2 and start tile 3; the
    # reference (slow on a CPU) is checked every 8th step and at the end, finiteness at every step.
    schedule = [([0, 1], [2 * g + 20, 2 * g + 20])] + [([0, 1], [1, 1])] * (n - 2 * g - 20)
    for j, (rows, qs) in enumerate(schedule):
        out, expected, qsl = h.step(rows, qs, check=j % 8 == 0 or j == len(schedule) - 1)
        mine = slice(int(qsl[1]), int(qsl[2]))
        assert torch.isfinite(out[mine]).all()
        if expected is not None:
            torch.testing.assert_close(out[mine], expected[mine], atol=tol, rtol=tol)
    assert h.done == [n, n]


def _causal(q, k, v, starts, qsl, true_k, true_v, rows, fmt):
    """Reference for a step where some row has no history yet: each row separately."""
    out = torch.empty_like(q)
    for j, i in enumerate(rows):
        a, e = int(qsl[j]), int(qsl[j + 1])
        cu = torch.tensor([0, e - a], dtype=torch.int32)
        if starts[j]:
            st = build_paged_kv([true_k[i][: starts[j]]], [true_v[i][: starts[j]]], fmt,
                                reference.quantize_into_cache_ref)
        else:
            st = build_paged_kv([true_k[i][:0]], [true_v[i][:0]], fmt, reference.quantize_into_cache_ref)
        out[a:e] = reference.paged_attention_ref(q[a:e], st, cu, k[a:e], v[a:e], cu)
    return out
