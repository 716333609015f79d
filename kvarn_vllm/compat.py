"""Every vLLM-version-specific hook of the plugin, in one place.

vLLM 0.22 has no registration API for a new KV-cache dtype, so the plugin extends it where 0.22 looks:
  - the `CacheDType` Literal (pydantic validation of `CacheConfig.cache_dtype` and the CLI's choices) and
    `STR_DTYPE_TO_TORCH_DTYPE` (pages are bytes);
  - `Attention.get_kv_cache_spec`: a KVarN layer's page is num_kv_heads records (`TQFullAttentionSpec` already
    sizes a page as block_size x heads x bytes per token, and its manager is the full-attention one);
  - backend choice: 0.22's priority lists never pick the CUSTOM slot, so KVarN layers are routed to it and
    skipped layers (`--kv-cache-dtype-skip-layers`) keep vLLM's own backend;
  - `VllmConfig.__post_init__`: the block size follows the preset, unsupported models are refused up front;
  - `GPUModelRunner._update_states`: staging slots follow vLLM's persistent batch.
A newer vLLM release is a new entry in `HOOKS` (0.23+ register spec classes, 0.28 adds `customize_spec`, 0.32
`register_backend` by name, 0.33 `register_kv_cache_dtype`), not a rewrite: 0.34's hooks are in `compat_034`.
"""

from __future__ import annotations

import functools
import logging
import typing
from collections.abc import Callable
from typing import Any

import torch

from kvarn_kernels import PRESETS, KVarNFormat
from kvarn_kernels.format import SUPPORTED_HEAD_DIMS

from .staging import speculative_tokens

logger = logging.getLogger("kvarn_vllm")

BACKEND_PATH = "kvarn_vllm.backend.KVarNAttentionBackend"
SUPPORTED_VLLM = ("0.22", "0.34")


def vllm_series(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_version(version: str) -> None:
    if vllm_series(version) not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"kvarn_vllm supports vLLM {', '.join(s + '.x' for s in SUPPORTED_VLLM)}; this is vLLM {version}. "
            f"Install vllm=={SUPPORTED_VLLM[0]}.0 (serving) or vllm=={SUPPORTED_VLLM[-1]}.0 (config level), or use "
            "the transformers front-end (kvarn_hf)."
        )


def _extend_cache_dtype() -> None:
    import pydantic
    from vllm.config import cache as cache_mod
    from vllm.utils import torch_utils
    from vllm.v1.attention import selector

    old = cache_mod.CacheDType
    names = tuple(typing.get_args(old))
    missing = tuple(p for p in PRESETS if p not in names)
    if missing:
        new = typing.Literal[names + missing]  # type: ignore[valid-type]
        cache_mod.CacheDType = new
        selector.CacheDType = new
        fields = cache_mod.CacheConfig.__dataclass_fields__
        fields["cache_dtype"].type = new
        cache_mod.CacheConfig.__annotations__["cache_dtype"] = new
        pydantic.dataclasses.rebuild_dataclass(cache_mod.CacheConfig, force=True)
        from vllm.config import vllm as vllm_mod

        pydantic.dataclasses.rebuild_dataclass(vllm_mod.VllmConfig, force=True)
        from vllm.engine import arg_utils

        arg_utils._compute_kwargs.cache_clear()
    for p in PRESETS:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE[p] = torch.uint8


def wrap_once(owner: Any, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
    """Replace owner.name by make(original), once: plugins load in every process and may load twice in one."""
    original = getattr(owner, name)
    if getattr(original, "_kvarn", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._kvarn = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


def _patch_kv_cache_spec() -> None:
    from vllm.model_executor.layers.attention import attention as attn_mod
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
            if self.kv_cache_dtype not in PRESETS:
                return original(self, vllm_config)
            fmt = KVarNFormat.from_preset(self.kv_cache_dtype, self.head_size)
            return TQFullAttentionSpec(
                block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
                head_size=self.head_size, head_size_v=self.head_size, dtype=torch.uint8,
                tq_slot_size=fmt.slot_bytes,  # whole bytes per token: rounded up at head_dim 96 with G = 128
            )

        return get_kv_cache_spec

    wrap_once(attn_mod.Attention, "get_kv_cache_spec", make)


def _route_backend() -> None:
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    original = selector._cached_get_attn_backend
    if getattr(original, "_kvarn", False):
        return

    @functools.cache
    def cached_get_attn_backend(backend: Any, attn_selector_config: Any, num_heads: int | None = None) -> Any:
        if attn_selector_config.kv_cache_dtype in PRESETS:
            from .backend import KVarNAttentionBackend

            return KVarNAttentionBackend
        return original(backend, attn_selector_config, num_heads)

    cached_get_attn_backend._kvarn = True  # type: ignore[attr-defined]
    selector._cached_get_attn_backend = cached_get_attn_backend


def validate_config(vllm_config: Any) -> None:
    """Refuse what KVarN cannot serve, at config time, naming the value and the alternatives; fix the block size."""
    cache = vllm_config.cache_config
    preset = cache.cache_dtype
    if preset not in PRESETS:
        return
    group = PRESETS[preset][2]
    model = vllm_config.model_config
    if cache.user_specified_block_size and cache.block_size != group:
        raise ValueError(f"--kv-cache-dtype {preset} stores one {group}-token tile per block: drop --block-size "
                         f"{cache.block_size} or pass --block-size {group}")
    cache.block_size = group
    if model is None:
        return
    if model.use_mla:
        raise ValueError(f"--kv-cache-dtype {preset} does not support MLA models ({model.model}); use fp8 or auto")
    if model.is_encoder_decoder:
        raise ValueError(f"--kv-cache-dtype {preset} supports decoder-only models, not encoder-decoder "
                         f"{model.model}")
    head = model.get_head_size()
    if head not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"--kv-cache-dtype {preset}: head_dim {head} is not supported: use a model with head_dim "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}, or --kv-cache-dtype fp8")
    if model.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--kv-cache-dtype {preset}: model dtype {model.dtype} is not supported: pass --dtype "
                         "bfloat16 or --dtype float16")
    window = getattr(model.hf_text_config, "sliding_window", None)
    layer_types = getattr(model.hf_text_config, "layer_types", None) or []
    if window or "sliding_attention" in layer_types:
        import vllm

        skipped = "sliding_window" in cache.kv_cache_dtype_skip_layers
        if vllm_series(vllm.__version__) == "0.22":
            # 0.22 unifies page sizes by growing block sizes: a 16-bit window page is no whole multiple of a KVarN page.
            raise ValueError(
                f"--kv-cache-dtype {preset}: {model.model} has sliding-window attention layers, which KVarN does not "
                "quantize, and vLLM 0.22 cannot mix their 16-bit pages with KVarN pages. Use fp8 for this model.")
        if not skipped:
            raise ValueError(
                f"--kv-cache-dtype {preset}: {model.model} has sliding-window attention layers, which KVarN does not "
                "quantize: pass --kv-cache-dtype-skip-layers sliding_window to keep them 16-bit, or use fp8.")
    fmt = KVarNFormat.from_preset(preset, head, model.dtype)
    sched = vllm_config.scheduler_config
    per_request = staging_request_bytes(preset, model, vllm_config.parallel_config,
                                        speculative_tokens(vllm_config.speculative_config)) or 0
    logger.warning(
        "KVarN %s: %d-bit keys, %d-bit values, %d-token tiles, %g bytes per token per KV head (%.2fx smaller "
        "than 16-bit); 16-bit: each sequence's first tile and its newest partial tile (staging slots for "
        "max_num_seqs=%d requests, %.2f GB per GPU, allocated before vLLM measures its KV budget)",
        preset, fmt.k_bits, fmt.v_bits, group, fmt.bytes_per_token_per_head, fmt.compression_vs_16bit,
        sched.max_num_seqs, (sched.max_num_seqs + 1) * per_request / 1e9)


def _patch_config_validation() -> None:
    from vllm.config import vllm as vllm_mod

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def post_init(self: Any) -> None:
            original(self)
            validate_config(self)

        return post_init

    wrap_once(vllm_mod.VllmConfig, "__post_init__", make)


def staging_request_bytes(preset: str, model_config: Any, parallel_config: Any, num_speculative: int) -> int | None:
    """One request's 16-bit staging (sink and tail slots, K and V, every attention layer of this rank), or None
    where the model is one `validate_config` refuses."""
    from .staging import StagingPool, overflow_rows

    try:
        fmt = KVarNFormat.from_preset(preset, model_config.get_head_size())
    except ValueError:
        return None
    layers = model_config.get_num_layers_by_block_type(parallel_config, "attention")
    heads = model_config.get_num_kv_heads(parallel_config)
    return layers * StagingPool.request_bytes(fmt, heads, overflow_rows(num_speculative), model_config.dtype)


def adjust_max_num_seqs(engine_args: Any, model_config: Any, parallel_config: Any, vllm_default: int) -> None:
    """Where the user gave no --max-num-seqs, cap vLLM's default so the staging pools (allocated for max_num_seqs
    requests before vLLM sizes its KV cache) take at most `staging.STAGING_SHARE` of the usable GPU memory."""
    from vllm.platforms import current_platform

    from .staging import STAGING_SHARE, default_max_num_seqs

    preset = engine_args.kv_cache_dtype
    per_request = staging_request_bytes(preset, model_config, parallel_config,
                                        speculative_tokens(engine_args.speculative_config))
    if per_request is None:
        return
    try:
        total = int(current_platform.get_device_total_memory())
    except Exception:  # no device to ask (config built off the GPU machine): keep vLLM's default
        return
    # 0.34 leaves it None until the engine resolves it (0.92, or 1.0 with its extensible KV cache): take 0.9.
    usable = int((engine_args.gpu_memory_utilization or 0.9) * total)
    chosen = default_max_num_seqs(per_request, usable, vllm_default)
    if chosen < vllm_default:
        engine_args.max_num_seqs = chosen
        logger.warning(
            "KVarN %s: max_num_seqs defaults to %d, not vLLM's %d: each running request keeps %.1f MB of 16-bit "
            "staging (its first tile and its newest partial tile), allocated up front for max_num_seqs requests; "
            "%d requests' staging is %.2f GB, %.0f%% of the %.1f GB vLLM may use. Pass --max-num-seqs to choose "
            "(more concurrent requests, less KV cache).",
            preset, chosen, vllm_default, per_request / 1e6, chosen, chosen * per_request / 1e9,
            100 * STAGING_SHARE, usable / 1e9)


def _patch_batch_defaults() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def set_defaults(self: Any, usage_context: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
            user_set = self.max_num_seqs is not None
            result = original(self, usage_context, model_config, *args, **kwargs)
            if not user_set and self.kv_cache_dtype in PRESETS:
                parallel_config = args[0] if args else kwargs["parallel_config"]
                adjust_max_num_seqs(self, model_config, parallel_config, self.max_num_seqs)
            return result

        return set_defaults

    wrap_once(EngineArgs, "_set_default_max_num_seqs_and_batched_tokens_args", make)


def _patch_runner() -> None:
    try:
        from vllm.v1.worker import gpu_model_runner
    except Exception:  # CPU-only installs may lack the GPU runner's dependencies; nothing runs there.
        return

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def update_states(self: Any, scheduler_output: Any) -> Any:
            result = original(self, scheduler_output)
            from .runtime import get_runtime

            rt = get_runtime()
            if rt is not None:
                rt.update(self.input_batch, scheduler_output)
            return result

        return update_states

    wrap_once(gpu_model_runner.GPUModelRunner, "_update_states", make)


def _from_034(name: str) -> Callable[[], None]:
    """A hook of `compat_034`, imported only when run (it subclasses the backend, which imports vLLM)."""

    def hook() -> None:
        from . import compat_034

        getattr(compat_034, name)()

    hook.__name__ = hook.__qualname__ = name
    return hook


HOOKS: dict[str, list[Callable[[], None]]] = {
    "0.22": [_extend_cache_dtype, _patch_kv_cache_spec, _route_backend, _patch_config_validation, _patch_batch_defaults,
             _patch_runner],
    "0.34": [_from_034("register_dtypes"), _from_034("register_backend_name"), _from_034("route_backend"),
             _patch_config_validation, _patch_batch_defaults],
}


def install(version: str) -> None:
    check_version(version)
    for hook in HOOKS[vllm_series(version)]:
        hook()
