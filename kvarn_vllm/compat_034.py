"""The vLLM 0.34 hooks of the plugin (dispatched from `compat.HOOKS["0.34"]`).

0.34 has official APIs for most of what 0.22 needed patched:
  - `register_kv_cache_dtype` (0.33+): each preset is a handler (uint8 storage, `KVQuantMode.CUSTOM`); it feeds
    `KV_CACHE_DTYPES` (config/CLI validation) and `STR_DTYPE_TO_TORCH_DTYPE`;
  - `register_backend("KVARN", path)` (0.32+): a backend name of its own, not the shared CUSTOM slot;
  - `AttentionBackend.customize_spec` (0.28+): the backend sets its layers' page; the spec stays vLLM's
    `FullAttentionSpec` (already in `KVCacheSpecRegistry`), so no spec class is registered;
  - `get_preferred_block_size` / `get_supported_kernel_block_sizes`: the worker's block-size pass picks the tile.
Two hooks have no API and stay patches: backend choice (`selector._cached_get_attn_backend`: CUDA's priority
lists never pick an out-of-tree backend, and `--attention-backend` would also send skipped 16-bit layers to it)
and config validation (`VllmConfig.__post_init__`, shared with 0.22 in `compat`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, ClassVar

import torch

from kvarn_kernels import PRESETS, KVarNFormat

from .backend import KVarNAttentionBackend, KVarNAttentionImpl, KVarNMetadataBuilder

BACKEND_NAME = "KVARN"
BACKEND_PATH_034 = "kvarn_vllm.compat_034.KVarNAttentionBackend034"

# The preset of the layers routed to KVarN in this process; `customize_spec` and the block-size queries use it
# where vLLM calls them outside a `set_current_vllm_config` context (0.34 raises there instead of defaulting).
_ROUTED_PRESET: str | None = None


def active_preset() -> str:
    """The KVarN preset this process serves: the current vLLM config's, else the one routed to KVarN."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    dtype = config.cache_config.cache_dtype if config is not None else None
    if dtype in PRESETS:
        return dtype
    if _ROUTED_PRESET is not None:
        return _ROUTED_PRESET
    raise RuntimeError(f"KVarN backend used without a KVarN --kv-cache-dtype (got {dtype!r}); pass one of "
                       f"{', '.join(PRESETS)}")


class KVarNAttentionImpl034(KVarNAttentionImpl):
    """0.34 hands each layer a [blocks, heads, G, slot_bytes] byte view (the logical [B, H, N, C] page of
    `customize_spec`); the kernel core reads a tile's record as one row: [blocks, heads, G·slot_bytes], whose first
    record_bytes the base forward takes (all of it but at head_dim 96 with 128-token tiles)."""

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        return super().forward(layer, query, key, value, as_records(kv_cache), attn_metadata, output,
                               output_scale, output_block_scale)


def as_records(kv_cache: torch.Tensor) -> torch.Tensor:
    """[B, H, N, C] → [B, H, N·C] without a copy (the LBHNC layout keeps each head's record contiguous)."""
    return kv_cache.flatten(2) if kv_cache.dim() == 4 else kv_cache


class KVarNMetadataBuilder034(KVarNMetadataBuilder):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        # The staging slots follow vLLM's persistent batch through a per-step hook; 0.34 replaced that runner
        # (model runner V2) and the hook is not ported: refuse to serve rather than attend with empty slots.
        raise RuntimeError(
            "KVarN on vLLM 0.34 is supported at config level only (CLI, configs, KV specs, backend choice); "
            "serving needs the staging-slot hook for vLLM 0.34's model runner, which is not ported yet. "
            "Serve with vllm==0.22.0.")


class KVarNAttentionBackend034(KVarNAttentionBackend):
    supported_kv_cache_dtypes: ClassVar[list[Any]] = list(PRESETS)

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int]:
        return [PRESETS[active_preset()][2]]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return PRESETS[active_preset()][2]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[Any, ...]:
        from vllm.v1.kv_cache_layout import KVCacheLayout

        # Layer-major, then block, head, token: each head's tile record is one contiguous run of bytes.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        """A KVarN page: num_kv_heads records of `record_bytes` per G-token block, stated per token
        (`KVarNFormat.slot_bytes`: record_bytes / G per head and token, rounded up where that is no whole number, i.e.
        head_dim 96 with 128-token tiles) so vLLM's per-token page arithmetic (skip-layer and hybrid alignment build
        specs of block_size 1) holds. 16-bit specs pass through."""
        from vllm.v1.kv_cache_interface import KVQuantMode

        if spec.kv_quant_mode != KVQuantMode.CUSTOM or spec.state_content_bytes is not None:
            return spec
        fmt = KVarNFormat.from_preset(active_preset(), spec.head_size)
        return replace(spec, state_content_bytes=fmt.slot_bytes)

    @staticmethod
    def get_impl_cls() -> type[KVarNAttentionImpl034]:
        return KVarNAttentionImpl034

    @staticmethod
    def get_builder_cls() -> type[KVarNMetadataBuilder034]:
        return KVarNMetadataBuilder034


def register_dtypes() -> None:
    """Official: one `register_kv_cache_dtype` handler per preset (uint8 pages, kernels chosen by the backend)."""
    from vllm.config.cache import get_kv_cache_dtype_handler, register_kv_cache_dtype
    from vllm.v1.kv_cache_interface import KVQuantMode

    for preset in PRESETS:
        if get_kv_cache_dtype_handler(preset) is not None:
            continue

        class Handler:
            name = preset

            def torch_dtype(self) -> torch.dtype:
                return torch.uint8

            def quant_mode(self) -> KVQuantMode:
                return KVQuantMode.CUSTOM

        Handler.__name__ = Handler.__qualname__ = f"KVarNHandler_{preset}"
        register_kv_cache_dtype(preset)(Handler)


def register_backend_name() -> None:
    """Official: the backend under its own name, so `--attention-backend KVARN` and vLLM's logs name it."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH_034)


def route_backend() -> None:
    """Patch (no API): KVarN layers get the KVarN backend; skipped layers ask with "auto" and keep vLLM's."""
    from vllm.v1.attention import selector

    original = selector._cached_get_attn_backend
    if getattr(original, "_kvarn", False):
        return

    @functools.cache
    def cached_get_attn_backend(backend: Any, attn_selector_config: Any, num_heads: int | None = None,
                                **kwargs: Any) -> Any:
        global _ROUTED_PRESET
        if attn_selector_config.kv_cache_dtype in PRESETS:
            _ROUTED_PRESET = attn_selector_config.kv_cache_dtype
            return KVarNAttentionBackend034
        return original(backend, attn_selector_config, num_heads, **kwargs)

    cached_get_attn_backend._kvarn = True  # type: ignore[attr-defined]
    selector._cached_get_attn_backend = cached_get_attn_backend
