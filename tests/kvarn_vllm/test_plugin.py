"""The plugin at config level on a CPU machine with vLLM 0.22 installed without its GPU dependencies
(`pip install --no-deps -r requirements/vllm-0.22-cpu.txt`): entry point, parser, configs, specs, routing, errors."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")
if not vllm.__version__.startswith("0.22."):
    pytest.skip(f"config-level tests target vLLM 0.22, found {vllm.__version__}", allow_module_level=True)

import vllm.platforms  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402

vllm.platforms._current_platform = CpuPlatform()

from kvarn_kernels import PRESETS, KVarNFormat  # noqa: E402
from kvarn_vllm import compat, register  # noqa: E402

register()

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm_models import check_default_max_num_seqs, engine_config, model_dir  # noqa: E402


def test_the_entry_point_names_register():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "kvarn"]
    assert len(eps) == 1 and eps[0].value == "kvarn_vllm:register"
    assert eps[0].load() is register


def test_the_cli_accepts_every_preset():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for preset in PRESETS:
        args = parser.parse_args(["--kv-cache-dtype", preset])
        assert args.kv_cache_dtype == preset
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "kvarn_k3v3_g128"])


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


@pytest.mark.parametrize(("overrides", "kwargs", "message"), [
    ({"head_dim": 80, "hidden_size": 320}, {}, "head_dim 80 is not supported: use a model with head_dim 64, 96, 128"),
    ({}, {"dtype": "float32"}, "model dtype torch.float32 is not supported"),
    ({"sliding_window": 512}, {}, "sliding-window attention layers"),
])
def test_unsupported_models_are_refused_at_start_up(tmp_path, overrides, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine_config(model_dir(tmp_path, **overrides), kv_cache_dtype="kvarn_k4v2_g128", **kwargs)


def test_a_head_dim_96_model_is_accepted(tmp_path):
    """Phi-3-mini's head_dim 96: the engine config is built, the KVarN backend takes the head size, and a page holds
    one unpadded (D = 96) record per KV head."""
    from kvarn_vllm.backend import KVarNAttentionBackend

    cfg = engine_config(model_dir(tmp_path, head_dim=96, hidden_size=384), kv_cache_dtype="kvarn_k4v2_g128")
    assert cfg.model_config.get_head_size() == 96 and cfg.cache_config.block_size == 128
    assert KVarNAttentionBackend.supports_head_size(96) and 96 in KVarNAttentionBackend.get_supported_head_sizes()
    # 10560-byte records are 82.5 bytes per token: vLLM counts whole bytes per token, so a page row is 128 x 83 bytes.
    assert KVarNAttentionBackend.get_kv_cache_shape(3, 128, 2, 96, "kvarn_k4v2_g128") == (3, 2, 10624)
    assert KVarNAttentionBackend.get_kv_cache_shape(3, 64, 2, 96, "kvarn_k4v2_g64") == (3, 2, 5568)  # 87 B exactly


def test_other_cache_dtypes_are_untouched(tmp_path):
    cfg = engine_config(model_dir(tmp_path), kv_cache_dtype="fp8", block_size=16)
    assert cfg.cache_config.cache_dtype == "fp8" and cfg.cache_config.block_size == 16


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_the_page_is_one_record_per_kv_head(preset, head_dim):
    from vllm.model_executor.layers.attention.attention import Attention

    fmt = KVarNFormat.from_preset(preset, head_dim)
    layer = SimpleNamespace(kv_cache_dtype=preset, head_size=head_dim, num_kv_heads=8)
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=fmt.group))
    spec = Attention.get_kv_cache_spec(layer, vllm_config)
    # A page is one record per KV head; at head_dim 96 with 128-token tiles (82.5 bytes per token) each record's row
    # is rounded up to whole bytes per token (64 bytes: 0.6 % of a k4v2 record, 0.9 % of a k2v2 one), as vLLM's page
    # arithmetic needs.
    padded = head_dim == 96 and fmt.group == 128
    assert spec.page_size_bytes == 8 * fmt.record_bytes + (8 * 64 if padded else 0) == 8 * fmt.page_row_bytes
    # The compression vLLM's capacity line reflects: a 16-bit page of the same tokens over this one.
    assert 2 * 2 * fmt.group * 8 * head_dim / spec.page_size_bytes == pytest.approx(
        fmt.compression_vs_16bit, rel=9e-3 if padded else 1e-9)
    from kvarn_vllm.backend import KVarNAttentionBackend

    assert KVarNAttentionBackend.get_kv_cache_shape(5, fmt.group, 8, head_dim, preset) == (5, 8, fmt.page_row_bytes)
    with pytest.raises(ValueError, match=f"needs block_size {fmt.group}"):
        KVarNAttentionBackend.get_kv_cache_shape(5, 16, 8, head_dim, preset)


def test_kvarn_layers_get_the_kvarn_backend_and_skipped_layers_keep_vllms():
    from vllm.v1.attention import selector
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from kvarn_vllm.backend import KVarNAttentionBackend

    def pick(kv_dtype):
        cfg = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype=kv_dtype, block_size=128)
        return selector._cached_get_attn_backend("AUTO", cfg)

    assert pick("kvarn_k4v2_g128") is KVarNAttentionBackend
    # A skipped layer asks with "auto": it gets the platform's own choice (on this CPU machine, its CPU backend).
    assert pick("auto") is not KVarNAttentionBackend


def test_skip_layers_keep_their_16_bit_spec():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    layer = SimpleNamespace(kv_cache_dtype="auto", head_size=128, num_kv_heads=8, sliding_window=None,
                            attn_type="decoder", head_size_v=128, kv_cache_torch_dtype=torch.bfloat16)
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=128),
                                  model_config=SimpleNamespace(use_mla=False))
    spec = Attention.get_kv_cache_spec(layer, vllm_config)
    assert type(spec) is FullAttentionSpec and spec.page_size_bytes == 128 * 8 * 128 * 2 * 2


def test_unsupported_vllm_releases_are_refused_by_name():
    compat.check_version("0.22.0")
    for version in ("0.21.1", "0.23.0", "0.33.1"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.22\.x, 0\.34\.x; this is vLLM "
                           + version.replace(".", r"\.")):
            compat.check_version(version)


def test_register_is_idempotent():
    from vllm.config import cache

    register()
    register()
    names = [n for n in cache.CacheDType.__args__ if n.startswith("kvarn_")]
    assert sorted(names) == sorted(PRESETS)



def test_max_num_seqs_defaults_to_what_the_staging_share_allows(tmp_path, monkeypatch, caplog):
    check_default_max_num_seqs(tmp_path, monkeypatch, caplog)

def test_speculative_tokens_count_in_the_staging_bytes():
    model = SimpleNamespace(get_head_size=lambda: 128, dtype=torch.bfloat16,
                            get_num_layers_by_block_type=lambda parallel, kind: 32,
                            get_num_kv_heads=lambda parallel: 8)
    plain = compat.staging_request_bytes("kvarn_k4v2_g128", model, None, 0)
    assert plain == 2 * 2 * 8 * 128 * 128 * 2 * 32
    assert compat.staging_request_bytes("kvarn_k4v2_g128", model, None, 3) == plain * (128 + 8) // 128
    model.get_head_size = lambda: 80
    assert compat.staging_request_bytes("kvarn_k4v2_g128", model, None, 0) is None


def test_default_max_num_seqs_bounds():
    from kvarn_vllm.staging import default_max_num_seqs

    assert default_max_num_seqs(10**6, 10**12, 1024) == 1024
    assert default_max_num_seqs(10**9, 10**10, 1024) == 8  # never below 8
    assert default_max_num_seqs(33_554_432, 77_000_000_000, 1024) == 112
    with pytest.raises(ValueError, match="request_bytes=0"):
        default_max_num_seqs(0, 10**10, 256)
