"""CPU smoke test of benchmarks/hf/bench_generate.py: a tiny random Qwen2 through every method, JSON + PNG written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "hf" / "bench_generate.py"

# 2 layers, head_dim 64 (hidden 128 / 2 heads), GQA 2; the defaults of a real Qwen2 otherwise.
TINY_QWEN2 = {
    "model_type": "qwen2", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_generate_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _quanto_available() -> bool:
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def test_bench_generate_cpu(tmp_path: Path) -> None:
    bench = _load_script()
    config = tmp_path / "tiny_qwen2.json"
    config.write_text(json.dumps(TINY_QWEN2))
    methods = ["dynamic", "kvarn", "kvarn-eager"] + (["quanto4", "quanto2"] if _quanto_available() else [])
    out = tmp_path / "out"
    # 600 positions: the 128-token sink, 3 quantized tiles and a 16-bit tail; float32 on the CPU.
    result = bench.main([
        "--model", str(config), "--device", "cpu", "--methods", *methods, "--contexts", "600", "--batches", "2",
        "--new-tokens", "3", "--warmup-steps", "1", "--warmup-context", "0", "--quanto-unpack", "torch",
        "--out", str(out),
    ])
    written = json.loads((out / "generate.json").read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"], default=str))
    assert (out / "generate.png").stat().st_size > 0
    assert "| kvarn-k4v2_g128 | 600 | 2 |" in (out / "generate.md").read_text()
    rows = {r["method"]: r for r in written["rows"]}
    quanto = {"quanto4", "quanto2"} if _quanto_available() else set()
    assert set(rows) == {"dynamic", "kvarn-k4v2_g128", "kvarn-k4v2_g128-eager"} | quanto
    for row in rows.values():
        assert "error" not in row, row
        assert row["decode_tokens_per_s"] > 0 and row["prefill_s"] > 0
        assert row["decode_steps"] == 3
        assert len(row["tokens_row0"]) == 1 + 1 + 3  # prefill token, warm-up step, timed steps
    dynamic, kvarn = rows["dynamic"], rows["kvarn-k4v2_g128"]
    # 16-bit: 2 layers x (K, V) x batch 2 x 1 head x 604 positions x 64 x 4 bytes (float32 on the CPU)
    assert dynamic["kv_bytes"] == 2 * 2 * 2 * 1 * 604 * 64 * 4
    assert kvarn["kv_bytes"] < dynamic["kv_bytes"]
    assert kvarn["kv_parts"]["tiles_used"] > 0  # tiles were quantized
    assert kvarn["ratio_kv_bytes_vs_dynamic"] == pytest.approx(kvarn["kv_bytes"] / dynamic["kv_bytes"])
    assert dynamic["ratio_speed_vs_dynamic"] == pytest.approx(1.0)
    # The graphed KVarN method: its decode steps went through DecodeGraphs (run eagerly on the CPU, no capture),
    # the prefill to the model; same tokens as the eager method.
    assert kvarn["graph_stats"] == {"replays": 0, "captures": 0, "static_eager": 4, "eager": 1}
    assert kvarn["match_tokens_vs_eager"] == 1.0 and "graph_stats" not in rows["kvarn-k4v2_g128-eager"]
    if _quanto_available():
        for name in ("quanto4", "quanto2"):
            assert rows[name]["kv_parts"]["quantized"] > 0
            assert rows[name]["kv_bytes"] < dynamic["kv_bytes"]
        assert rows["quanto2"]["kv_bytes"] < rows["quanto4"]["kv_bytes"]
        assert "ratio_speed_vs_quanto4" in kvarn and "ratio_speed_vs_quanto2" in kvarn
        assert written["setup"]["quanto"]["unpack"]["mode"] == "torch"
    setup = written["setup"]
    assert setup["dtype"] == "float32" and setup["versions"]["torch"]
    assert setup["model"]["head_dim"] == 64 and setup["model"]["weights"] == "random"


def test_stored_configs_load() -> None:
    bench = _load_script()
    for name, (layers, kv_heads, head_dim) in {"qwen2.5-coder-0.5b": (24, 2, 64), "qwen2.5-coder-1.5b": (28, 2, 128),
                                               "smollm2-135m": (30, 3, 64)}.items():
        config = bench.load_config(name)
        assert config.num_hidden_layers == layers and config.num_key_value_heads == kv_heads
        assert (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) == head_dim
