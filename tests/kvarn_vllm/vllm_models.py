"""A tiny Llama config folder and the engine config vLLM builds for it (no weights: load_format="dummy").
Import after the test module has chosen vLLM's platform and registered the plugin."""

from __future__ import annotations

import json


def model_dir(tmp_path, **overrides) -> str:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2,
        "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def engine_config(model: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, skip_tokenizer_init=True, load_format="dummy", **kwargs).create_engine_config()


LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "num_hidden_layers": 32, "max_position_embeddings": 16384}


def check_default_max_num_seqs(tmp_path, monkeypatch, caplog) -> None:
    """Shared by the 0.22 and 0.34 plugin tests: max_num_seqs when the user gives none."""
    import pytest
    from vllm.platforms import current_platform

    from kvarn_kernels import KVarNFormat

    h100 = 81559 * 2**20  # an H100 80GB HBM3's total memory as CUDA reports it
    monkeypatch.setattr(type(current_platform), "get_device_total_memory", classmethod(lambda cls, i=0: h100))
    model = model_dir(tmp_path, **LLAMA_8B)
    # Llama-3.1-8B shape, k4v2_g128, bf16: 2 slots x K,V x 8 heads x 128 x 128 x 2 B x 32 layers = 33.55 MB per
    # request; 5 % of 0.9 x 85.5 GB = 3.85 GB holds 114 requests' slots, rounded down to a multiple of 8.
    per_request = 2 * 2 * 8 * 128 * 128 * 2 * 32
    with caplog.at_level("WARNING", logger="kvarn_vllm"):
        cfg = engine_config(model, kv_cache_dtype="kvarn_k4v2_g128")
    assert cfg.scheduler_config.max_num_seqs == 112
    assert "max_num_seqs defaults to 112" in caplog.text and "Pass --max-num-seqs" in caplog.text
    staging = 113 * per_request  # 112 request slots and the trash slot
    assert staging <= 0.05 * 0.9 * h100
    # What that leaves vLLM at the 57.5 GB KV budget bf16 had on this machine (438 912 tokens x 128 KiB): the
    # token capacity over bf16's, every byte of staging counted. Goal: >= 4.3x.
    budget = 438_912 * 32 * 8 * 128 * 2 * 2
    fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128)
    kvarn_tokens = (budget - staging) // (32 * 8 * fmt.record_bytes // fmt.group)
    assert kvarn_tokens / 438_912 == pytest.approx(4.43, abs=0.01)
    # A user's choice is kept, as is vLLM's default where the staging fits the share, and other dtypes are untouched.
    assert engine_config(model, kv_cache_dtype="kvarn_k4v2_g128", max_num_seqs=256).scheduler_config.max_num_seqs == 256
    (tmp_path / "tiny").mkdir()
    small = model_dir(tmp_path / "tiny")
    assert engine_config(small, kv_cache_dtype="kvarn_k4v2_g64").scheduler_config.max_num_seqs == \
        engine_config(small).scheduler_config.max_num_seqs
    assert engine_config(model, kv_cache_dtype="fp8").scheduler_config.max_num_seqs == \
        engine_config(model).scheduler_config.max_num_seqs

