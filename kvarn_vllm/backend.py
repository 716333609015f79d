"""The KVarN attention backend for vLLM: pages of packed tiles, 16-bit staging slots, the kernel core's attention.

One vLLM block holds one tile (block_size = G): page = num_kv_heads records of `KVarNFormat.record_bytes`.
Each layer's step: `StagingPool.pre` → `kvarn_kernels.ops.paged_attention` → `StagingPool.post` (a pure decode
step commits first and attends without new tokens, which is the decode kernel's fast path). The per-step plan
is built once by the metadata builder into persistent buffers, so FULL CUDA graphs of decode replay it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvarn_kernels import PRESETS, KVarNFormat, PagedKV, ops
from kvarn_kernels.format import SUPPORTED_HEAD_DIMS

from .runtime import get_runtime, init_runtime
from .staging import StepPlan, overflow_rows, plan_step, speculative_tokens

try:  # vLLM is an optional dependency of the package; this module is imported only when it is there.
    from vllm.config import VllmConfig, get_current_vllm_config
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionMetadata,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
    )
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError("kvarn_vllm.backend needs vLLM: pip install 'kvarn[vllm]'") from exc


def current_group() -> int:
    """The tile size of the configured preset (vLLM asks for block sizes outside any layer)."""
    dtype = get_current_vllm_config().cache_config.cache_dtype
    return PRESETS[dtype][2] if dtype in PRESETS else 128


class KVarNAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = list(PRESETS)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return [current_group()]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return current_group()

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        fmt = KVarNFormat.from_preset(cache_dtype_str, head_size)
        if block_size != fmt.group:
            raise ValueError(f"KVarN {cache_dtype_str} needs block_size {fmt.group} (one tile per block), got "
                             f"{block_size}")
        # A row per (block, KV head): the record, plus unused bytes where it is no whole number of bytes per token
        # (head_dim 96 with 128-token tiles; `KVarNFormat.page_row_bytes`). forward() reads the records' part.
        return (num_blocks, num_kv_heads, fmt.page_row_bytes)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_DIMS

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: Any) -> bool:
        return kv_cache_dtype in PRESETS

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[KVarNAttentionImpl]:
        return KVarNAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVarNMetadataBuilder]:
        return KVarNMetadataBuilder


@dataclass
class KVarNMetadata(AttentionMetadata):
    plan: StepPlan
    query_start_loc: torch.Tensor
    block_table: torch.Tensor  # [B, W - 1]: vLLM's table without block 0 (tile 0 is the 16-bit sink)
    num_actual_tokens: int
    max_query_len: int
    max_history: int


class _Persistent:
    """Fixed-address copies of a plan's tensors (CUDA graphs read what the capture saw)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def put(self, name: str, value: torch.Tensor, capacity: int) -> torch.Tensor:
        n = value.shape[0]
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < max(n, capacity) or buf.shape[1:] != value.shape[1:]:
            buf = torch.empty((max(n, capacity), *value.shape[1:]), dtype=value.dtype, device=value.device)
            self.buffers[name] = buf
        buf[:n].copy_(value)
        return buf[:n]


class KVarNMetadataBuilder(AttentionMetadataBuilder[KVarNMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.preset = vllm_config.cache_config.cache_dtype
        self.fmt = KVarNFormat.from_preset(self.preset, kv_cache_spec.head_size)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.runtime = runtime_for(vllm_config, device)
        sched = vllm_config.scheduler_config
        self.max_rows = sched.max_num_seqs
        self.max_tokens = sched.max_num_batched_tokens
        self.persistent = _Persistent()
        # Allocated here, not at the first build: a build may run while vLLM captures a CUDA graph.
        p, dev, i32, i64 = self.persistent, device, torch.int32, torch.int64
        for name, dtype, cols in (("hist", i32, ()), ("dense", i32, (2,)), ("pre_starts", i32, ()),
                                  ("pre_blocks", i32, ()), ("shift_rows", i64, ()), ("comp_starts", i32, ()),
                                  ("comp_blocks", i32, ())):
            p.put(name, torch.zeros((0, *cols), dtype=dtype, device=dev), self.max_rows)
        for name in ("write1_slot", "write1_off", "write2_slot", "write2_off"):
            p.put(name, torch.zeros(0, dtype=i64, device=dev), self.max_tokens)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVarNMetadata:
        return self._build(common_attn_metadata, capture=False)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVarNMetadata:
        return self._build(common_attn_metadata, capture=True)

    def _build(self, cam: CommonAttentionMetadata, capture: bool) -> KVarNMetadata:
        rt = self.runtime
        b = cam.seq_lens.shape[0]
        table = cam.block_table_tensor[:b]
        row_slot = rt.slots.row_slot[:b]
        if capture:
            row_slot = torch.full_like(row_slot, rt.num_slots)  # dummy rows: trash slot, nothing persists
        num_tokens = cam.slot_mapping.shape[0]
        plan = plan_step(cam.query_start_loc, cam.seq_lens, table, row_slot, rt.slots.frontier, num_tokens,
                         cam.max_query_len, self.fmt, rt.num_slots, self.num_kv_heads, rt.overflow,
                         rt.num_speculative)
        p = self.persistent
        rows, toks = self.max_rows, self.max_tokens
        plan.hist = p.put("hist", plan.hist, rows)
        plan.dense_table = p.put("dense", plan.dense_table, rows)
        for name in ("pre_starts", "pre_blocks", "shift_rows", "comp_starts", "comp_blocks"):
            setattr(plan, name, p.put(name, getattr(plan, name), rows))
        for name in ("write1_slot", "write1_off", "write2_slot", "write2_off"):
            setattr(plan, name, p.put(name, getattr(plan, name), toks))
        # Graph replays size the attention grid by the capture's bound: decode batches use the model's limit.
        max_history = rt.max_model_len if cam.max_query_len == 1 else int(cam.max_seq_len)
        bt = table[:, 1:] if table.shape[1] > 1 else torch.zeros(b, 1, dtype=torch.int32, device=table.device)
        return KVarNMetadata(plan=plan, query_start_loc=cam.query_start_loc[: b + 1], block_table=bt,
                             num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
                             max_history=max_history)


def runtime_for(vllm_config: VllmConfig, device: torch.device | str) -> Any:
    num_spec = speculative_tokens(vllm_config.speculative_config)
    sched = vllm_config.scheduler_config
    return init_runtime(preset=vllm_config.cache_config.cache_dtype, num_slots=sched.max_num_seqs,
                        overflow=overflow_rows(num_spec), num_speculative=num_spec, max_rows=sched.max_num_seqs,
                        max_model_len=vllm_config.model_config.max_model_len, device=device)


class KVarNAttentionImpl(AttentionImpl[KVarNMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **kwargs: Any) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap, "kv_sharing_target_layer_name": kv_sharing_target_layer_name}
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"KVarN {kv_cache_dtype}: {name}={value!r} is not supported; keep such layers on "
                                 "vLLM's own backend with --kv-cache-dtype-skip-layers")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"KVarN supports decoder self-attention only, not {attn_type}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.preset = kv_cache_dtype
        KVarNFormat.from_preset(kv_cache_dtype, head_size)  # validates preset and head_size
        self.fmt: KVarNFormat | None = None
        vllm_config = get_current_vllm_config()
        self.runtime_args = vllm_config

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KVarNMetadata | None, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("KVarN does not produce quantized attention outputs")
        if output is None:
            output = torch.empty(query.shape[0], self.num_heads * self.head_size, dtype=query.dtype,
                                 device=query.device)
        if self.fmt is None:
            self.fmt = KVarNFormat.from_preset(self.preset, self.head_size, query.dtype)
            ops.self_check(self.fmt, query.dtype, query.device) if query.is_cuda else None
        rt = get_runtime() or runtime_for(self.runtime_args, query.device)
        # Allocated at the first call, which is vLLM's profiling run: the pools count as model memory, so the
        # KV budget vLLM reports afterwards is what is really left.
        pool = rt.pool(layer.layer_name, self.fmt, self.num_kv_heads, query.dtype)
        if attn_metadata is None:
            return output.zero_()
        kv_cache = kv_cache[..., : self.fmt.record_bytes]  # the records of page rows (wider at head_dim 96)
        rt.caches[layer.layer_name] = kv_cache
        plan = attn_metadata.plan
        n = attn_metadata.num_actual_tokens
        t = plan.write1_slot.shape[0]
        q = query[:t].view(t, self.num_heads, self.head_size)
        k = key[:t].view(t, self.num_kv_heads, self.head_size)
        v = value[:t].view(t, self.num_kv_heads, self.head_size)
        if k.stride() != v.stride():
            # Compiled models hand over K as a fresh tensor (RoPE out of place) and V as a view of the fused QKV
            # output; the kernels take one stride pair for both.
            k, v = k.contiguous(), v.contiguous()
        b = plan.hist.shape[0]
        state = PagedKV(fmt=self.fmt, cache=kv_cache, block_table=attn_metadata.block_table, seq_lens=plan.hist,
                        sink_k=pool.k, sink_v=pool.v, tail_k=pool.k, tail_v=pool.v,
                        dense_table=plan.dense_table)
        qsl = attn_metadata.query_start_loc
        if plan.commit_first:
            pool.post(plan, k, v, kv_cache)
            out = ops.paged_attention(q[:b], state, qsl, 1, sm_scale=self.scale,
                                      max_history=attn_metadata.max_history)
        else:
            pool.pre(plan, kv_cache)
            pool.commit(plan, k, v, kv_cache)
            rt.copy_step_sinks(pool)
            out = ops.paged_attention(q, state, qsl, attn_metadata.max_query_len, k, v, qsl, sm_scale=self.scale,
                                      max_history=attn_metadata.max_history)
            pool.finish(plan, k, v)
        rows = out.shape[0]
        output[:rows].view(rows, self.num_heads, self.head_size).copy_(out)
        if n < output.shape[0] and not torch.cuda.is_current_stream_capturing():
            output[max(n, rows):].zero_()
        return output
