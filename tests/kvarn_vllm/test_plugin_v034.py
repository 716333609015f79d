"""The plugin at config level on a CPU machine with vLLM 0.34 installed without its GPU dependencies
(`scripts/test_vllm034.sh`): entry point, parser, configs, the official registrations, KV specs through vLLM's
own spec/planner/allocator path, backend routing, block sizes, errors."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")
if not vllm.__version__.startswith("0.34."):
    pytest.skip(f"config-level tests target vLLM 0.34, found {vllm.__version__}", allow_module_level=True)

import vllm.platforms  # noqa: E402
import vllm.triton_utils  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402

vllm.platforms._current_platform = CpuPlatform()
# 0.34's CPU platform insists on triton-cpu for x86 before it accepts a config; nothing here runs a kernel.
vllm.triton_utils.HAS_TRITON = True

from kvarn_kernels import PRESETS, KVarNFormat  # noqa: E402
from kvarn_vllm import compat, compat_034, register  # noqa: E402

register()

from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.layers.attention.attention import Attention  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.v1.worker.utils import customize_attention_spec  # noqa: E402
from vllm_models import check_default_max_num_seqs, engine_config, model_dir  # noqa: E402

from kvarn_vllm.compat_034 import KVarNAttentionBackend034  # noqa: E402


def _layers(cfg, num_layers: int = 2, head_dim: int = 64, num_kv_heads: int = 2) -> dict[str, Attention]:
    """Real vLLM attention layers built as a model would build them (they pick their backend on creation)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with set_current_vllm_config(cfg):
            return {f"model.layers.{i}.self_attn.attn": Attention(
                num_heads=2 * num_kv_heads, head_size=head_dim, scale=head_dim ** -0.5, num_kv_heads=num_kv_heads,
                cache_config=cfg.cache_config, prefix=f"model.layers.{i}.self_attn.attn") for i in range(num_layers)}
    finally:
        torch.set_default_dtype(old)


def _specs(cfg, layers: dict[str, Attention]) -> dict:
    """What 0.34's worker reports: each layer's spec, customized by the layer's backend."""
    with set_current_vllm_config(cfg):
        return {name: customize_attention_spec(layer.get_attn_backend(), layer.get_kv_cache_spec(cfg))
                for name, layer in layers.items()}


def test_the_entry_point_names_register():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "kvarn"]
    assert len(eps) == 1 and eps[0].value == "kvarn_vllm:register"
    assert eps[0].load() is register


def test_every_preset_is_registered_through_the_official_dtype_api():
    from vllm.config.cache import KV_CACHE_DTYPES, get_kv_cache_dtype_handler
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode

    for preset in PRESETS:
        assert KV_CACHE_DTYPES.count(preset) == 1
        handler = get_kv_cache_dtype_handler(preset)
        assert handler.name == preset and handler.torch_dtype() is torch.uint8
        assert get_kv_quant_mode(preset) is KVQuantMode.CUSTOM
        assert STR_DTYPE_TO_TORCH_DTYPE[preset] is torch.uint8


def test_the_backend_is_registered_under_its_own_name():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum["KVARN"].get_class() is KVarNAttentionBackend034
    assert KVarNAttentionBackend034.get_name() == "KVARN"


def test_the_cli_accepts_every_preset_and_configs_refuse_unknown_names(tmp_path):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for preset in PRESETS:
        assert parser.parse_args(["--kv-cache-dtype", preset]).kv_cache_dtype == preset
    # 0.34's parser takes any string; CacheConfig validates it against the registered names.
    with pytest.raises(ValueError, match="Invalid kv_cache_dtype: 'kvarn_k3v3_g128'"):
        engine_config(model_dir(tmp_path), kv_cache_dtype="kvarn_k3v3_g128")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_block_size_follows_the_preset(tmp_path, preset):
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype=preset)
    assert cfg.cache_config.cache_dtype == preset
    assert cfg.cache_config.block_size == PRESETS[preset][2]


def test_a_conflicting_block_size_is_refused_with_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="pass --block-size 128"):
        engine_config(model_dir(tmp_path), kv_cache_dtype="kvarn_k4v2_g128", block_size=16)
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype="kvarn_k4v2_g64", block_size=64)
    assert cfg.cache_config.block_size == 64


@pytest.mark.parametrize("preset", ["kvarn_k4v2_g128", "kvarn_k4v4_g64"])
def test_vllms_own_block_size_pass_picks_the_tile(tmp_path, preset):
    """The pass CUDA runs after model load (`Platform.update_block_size_for_backend`; official API:
    get_preferred_block_size) lands on the tile too."""
    from vllm.platforms.interface import Platform

    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype=preset)
    _layers(cfg)
    cfg.cache_config.block_size = 64 if PRESETS[preset][2] != 64 else 16
    Platform.update_block_size_for_backend(cfg)
    assert cfg.cache_config.block_size == PRESETS[preset][2]


@pytest.mark.parametrize(("overrides", "kwargs", "message"), [
    ({"head_dim": 80, "hidden_size": 320}, {}, "head_dim 80 is not supported: use a model with head_dim 64, 96, 128"),
    ({}, {"dtype": "float32"}, "model dtype torch.float32 is not supported"),
    ({"sliding_window": 512}, {}, "sliding-window attention layers"),
])
def test_unsupported_models_are_refused_at_start_up(tmp_path, overrides, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine_config(model_dir(tmp_path, **overrides), kv_cache_dtype="kvarn_k4v2_g128", **kwargs)


def test_sliding_window_models_are_accepted_when_their_window_layers_stay_16_bit(tmp_path):
    cfg = engine_config(model_dir(tmp_path, sliding_window=512), kv_cache_dtype="kvarn_k4v2_g128",
                  kv_cache_dtype_skip_layers=["sliding_window"])
    assert cfg.cache_config.block_size == 128 and cfg.cache_config.kv_cache_dtype_skip_layers == ["sliding_window"]


def test_other_cache_dtypes_are_untouched(tmp_path):
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype="fp8", block_size=16)
    assert cfg.cache_config.cache_dtype == "fp8" and cfg.cache_config.block_size == 16


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_the_page_is_one_record_per_kv_head(tmp_path, preset, head_dim):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    fmt = KVarNFormat.from_preset(preset, head_dim)
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype=preset)
    layer = SimpleNamespace(kv_cache_dtype=preset, head_size=head_dim, head_size_v=head_dim, num_kv_heads=8,
                            sliding_window=None, attn_type="decoder", kv_cache_torch_dtype=torch.uint8)
    with set_current_vllm_config(cfg):
        spec = customize_attention_spec(KVarNAttentionBackend034, Attention.get_kv_cache_spec(layer, cfg))
    assert type(spec) is FullAttentionSpec and spec.kv_quant_mode is get_kv_quant_mode(preset)
    # One record per KV head; at head_dim 96 with 128-token tiles (82.5 bytes per token) each record's row is rounded
    # up to whole bytes per token (64 bytes: 0.6 % of a k4v2 record, 0.9 % of a k2v2 one).
    padded = head_dim == 96 and fmt.group == 128
    assert spec.block_size == fmt.group and spec.page_size_bytes == 8 * fmt.page_row_bytes
    assert fmt.page_row_bytes == fmt.record_bytes + (64 if padded else 0)
    # The compression vLLM's capacity line reflects: a 16-bit page of the same tokens over this one.
    assert 2 * 2 * fmt.group * 8 * head_dim / spec.page_size_bytes == pytest.approx(
        fmt.compression_vs_16bit, rel=9e-3 if padded else 1e-9)
    # vLLM's per-token page arithmetic (skip-layer and hybrid alignment use block_size 1) stays exact.
    with set_current_vllm_config(cfg):
        one = KVarNAttentionBackend034.customize_spec(FullAttentionSpec(
            block_size=1, num_kv_heads=8, head_size=head_dim, dtype=torch.uint8, kv_quant_mode=spec.kv_quant_mode))
    assert one.page_size_bytes * fmt.group == spec.page_size_bytes


@pytest.mark.parametrize("head_dim", [64, 96])
def test_vllms_planner_and_allocator_give_each_layer_its_tiles(tmp_path, head_dim):
    """Specs from real layers → 0.34's layout resolution, KV cache planning and allocation (the engine core's
    and the worker's code): the block count is memory / (layers x page) and each layer's view is
    [blocks, heads, page_row_bytes] once the backend flattens it (record_bytes but at head_dim 96, whose 10560-byte
    k4v2 records sit in 10624-byte rows that the kernel core reads through their stride)."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
    from vllm.v1.worker.utils import allocate_kv_cache

    preset = "kvarn_k4v2_g128"
    fmt = KVarNFormat.from_preset(preset, head_dim)
    overrides = {"head_dim": 96, "hidden_size": 384} if head_dim == 96 else {}
    cfg = engine_config(model_dir(tmp_path, **overrides), kv_cache_dtype=preset)
    specs = _specs(cfg, _layers(cfg, head_dim=head_dim))
    layouts = [[layout.name for layout in KVarNAttentionBackend034.supported_kv_cache_layouts()]]
    layout = resolve_kv_cache_layout(cfg, layouts, list(specs.values()))
    groups = get_global_kv_cache_groups(cfg, [specs])
    assert len(groups) == 1 and sorted(groups[0].layer_names) == sorted(specs)
    blocks = 37
    row = fmt.page_row_bytes
    kv_config = get_kv_cache_configs(cfg, [specs], [blocks * 2 * 2 * row + 100], groups)[0]
    assert kv_config.num_blocks == blocks
    caches = allocate_kv_cache(kv_config, torch.device("cpu"), layout)
    for cache in caches.values():
        records = compat_034.as_records(cache)
        assert records.shape == (blocks, 2, row) and records.dtype == torch.uint8
        assert records.stride() == (2 * row, row, 1)
        assert records.data_ptr() == cache.data_ptr()  # a view: the backend writes vLLM's pages
        fmt.check_cache(records[..., : fmt.record_bytes])  # what the backend's forward hands the kernel core


@pytest.mark.parametrize("skip", ["0", "1"])
def test_skipped_layers_share_vllms_plan_with_kvarn_layers(tmp_path, skip):
    """--kv-cache-dtype-skip-layers through CUDA's block-size pass, the planner and the allocator: one block table
    for a KVarN layer and a 16-bit layer, kernel blocks of one tile. 0.34 enlarges the scheduler's block to a
    multiple of the tile when a KVarN layer comes first (its mixed-dtype alignment); kernel blocks stay tiles."""
    import math

    from vllm.platforms.interface import Platform
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
    from vllm.v1.worker.utils import allocate_kv_cache, select_common_block_size

    preset = "kvarn_k4v2_g128"
    fmt = KVarNFormat.from_preset(preset, 64)
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype=preset, kv_cache_dtype_skip_layers=[skip])
    layers = _layers(cfg)
    Platform.update_block_size_for_backend(cfg)
    block = cfg.cache_config.block_size
    # KVarN first: the smallest multiple of the tile whose KVarN page covers a 16-bit tile (ceil of the ratio).
    assert block == (fmt.group if skip == "0" else fmt.group * math.ceil(2 * 2 * 64 / (fmt.record_bytes / fmt.group)))
    specs = _specs(cfg, layers)
    layout = resolve_kv_cache_layout(cfg, [["LBHNC"]], list(specs.values()))
    groups = get_global_kv_cache_groups(cfg, [specs])
    assert len(groups) == 1
    kv_config = get_kv_cache_configs(cfg, [specs], [10**7], groups)[0]
    backends = [layer.get_attn_backend() for layer in layers.values()]
    with set_current_vllm_config(cfg):  # as in the worker's KV cache set-up
        kernel_block = select_common_block_size(block, backends, list(specs.values()))
    assert kernel_block == fmt.group
    caches = allocate_kv_cache(kv_config, torch.device("cpu"), layout, kernel_block_sizes=[kernel_block])
    tiles = kv_config.num_blocks * block // fmt.group
    kvarn_name, skip_name = (f"model.layers.{i}.self_attn.attn" for i in ((1, 0) if skip == "0" else (0, 1)))
    assert compat_034.as_records(caches[kvarn_name]).shape == (tiles, 2, fmt.record_bytes)
    assert caches[skip_name].shape == (tiles, 2, fmt.group, 2 * 64) and caches[skip_name].dtype == torch.bfloat16


def test_kvarn_layers_get_the_kvarn_backend_and_skipped_layers_keep_vllms(tmp_path):
    from vllm.v1.attention import selector
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.kv_cache_interface import KVQuantMode

    def pick(kv_dtype):
        sel = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype=kv_dtype, block_size=None)
        return selector._cached_get_attn_backend(None, sel, _run_kv_cache_dtype="kvarn_k4v2_g128")

    assert pick("kvarn_k4v2_g128") is KVarNAttentionBackend034
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype="kvarn_k4v2_g128", kv_cache_dtype_skip_layers=["1"])
    with set_current_vllm_config(cfg):
        assert pick("auto") is not KVarNAttentionBackend034
    # Real layers: layer 1 is skipped, asks with "auto", keeps the platform's backend and a 16-bit page.
    layers = _layers(cfg)
    kvarn, skipped = layers["model.layers.0.self_attn.attn"], layers["model.layers.1.self_attn.attn"]
    assert kvarn.get_attn_backend() is KVarNAttentionBackend034 and kvarn.kv_cache_dtype == "kvarn_k4v2_g128"
    assert skipped.get_attn_backend() is not KVarNAttentionBackend034 and skipped.kv_cache_dtype == "auto"
    specs = _specs(cfg, layers)
    assert specs["model.layers.1.self_attn.attn"].kv_quant_mode is KVQuantMode.NONE
    assert specs["model.layers.1.self_attn.attn"].page_size_bytes == 128 * 2 * 64 * 2 * 2
    assert specs["model.layers.0.self_attn.attn"].page_size_bytes == 2 * KVarNFormat.from_preset(
        "kvarn_k4v2_g128", 64).record_bytes


def test_serving_on_034_is_refused_until_the_runner_hook_is_ported(tmp_path):
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype="kvarn_k4v2_g128")
    spec = next(iter(_specs(cfg, _layers(cfg, num_layers=1)).values()))
    with pytest.raises(RuntimeError, match="config level only.*Serve with vllm==0.22.0"):
        KVarNAttentionBackend034.get_builder_cls()(spec, ["model.layers.0.self_attn.attn"], cfg,
                                                   torch.device("cpu"))


def test_unsupported_vllm_releases_are_refused_by_name():
    compat.check_version("0.22.0")
    compat.check_version("0.34.0")
    for version in ("0.21.1", "0.23.0", "0.33.1", "0.35.0"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.22\.x, 0\.34\.x; this is vLLM "
                           + version.replace(".", r"\.")):
            compat.check_version(version)


def test_register_is_idempotent():
    from vllm.config.cache import KV_CACHE_DTYPES
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    route = selector._cached_get_attn_backend
    register()
    for hook in compat.HOOKS["0.34"]:
        hook()
    assert all(KV_CACHE_DTYPES.count(p) == 1 for p in PRESETS)
    assert AttentionBackendEnum._member_names_.count("KVARN") == 1
    assert selector._cached_get_attn_backend is route


def test_max_num_seqs_defaults_to_what_the_staging_share_allows(tmp_path, monkeypatch, caplog):
    check_default_max_num_seqs(tmp_path, monkeypatch, caplog)
