"""The `kvarn` command line: help for every command, errors before any model loads, selfcheck's explanation."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch

from kvarn_eval import cli, demo


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("command", ["info", "selfcheck", "demo", "assets", "eval", "pareto"])
def test_subcommand_help_prints_its_own_usage(command, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main([command, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvarn {command}")
    assert "usage: kvarn [-h]" not in out


def test_every_option_has_help_text():
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {action.dest}")

    walk(cli.build_parser(), "kvarn")
    assert missing == []


def test_demo_refuses_a_bad_preset_before_loading_anything(monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("the model must not load for a bad preset")

    monkeypatch.setattr(demo, "run", no_run)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as ei:
        cli.main(["demo", "--preset", "k4v2"])
    assert ei.value.code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "preset 'k4v2' is unknown (did you mean kvarn_k4v2_g128?)" in err


@pytest.mark.parametrize("args", [["--new-tokens", "0"], ["--ppl-tokens", "-5"], ["--new-tokens", "many"]])
def test_demo_refuses_bad_numbers(args, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(SystemExit) as ei:
        cli.main(["demo", *args])
    assert ei.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("argv", [["selfcheck", "--device", "cuda"], ["demo", "--device", "cuda"],
                                  ["eval", "perplexity", "--device", "cuda"]])
def test_cuda_on_a_cpu_machine_is_a_clear_error(argv, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("must not run"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvarn: error: --device cuda was given but torch") and "no CUDA device" in err
    assert "Traceback" not in err


def test_info_shows_head_dim_96(capsys):
    """Phi-3-mini's head_dim 96: the record is sized with D = 96 (82.5 B per token, 4.65x); vLLM's page row, which
    counts whole bytes per token, is shown too."""
    assert cli.main(["info", "--head-dim", "96"]) == 0
    out = capsys.readouterr().out
    assert "head_dim 96" in out and "10560 B" in out and "82.50 (16-bit: 384)" in out and "4.65x" in out
    assert "vLLM page row per (tile, KV head): 10624 B (83 B per token, 4.63x)" in out
    assert cli.main(["info", "--head-dim", "128"]) == 0
    assert "vLLM page row" not in capsys.readouterr().out  # exact at 128
    assert cli.main(["info", "--head-dim", "96", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["record_bytes"] == 10560 and info["page_row_bytes"] == 10624
    assert cli.main(["info", "--head-dim", "80"]) == 2
    assert "head_dim 80 is not supported: use one of (64, 96, 128, 256)" in capsys.readouterr().err


def test_selfcheck_explains_its_numbers(capsys):
    assert cli.main(["selfcheck", "--device", "cpu", "--head-dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "bf16 (floor)" in out and "How to read this" in out and "KIVI-style RTN" in out
    line = next(s for s in out.splitlines() if s.strip().startswith("attention output"))
    kvarn, kivi, floor = (float(x) for x in line.split()[-3:])
    assert floor < kvarn < kivi  # the floor is far below; KVarN beats RTN at equal bits on outlier channels


def test_eval_checks_methods_before_loading_the_model(monkeypatch, capsys):
    from kvarn_eval import evaluate

    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("must not load"))
    assert cli.main(["eval", "gsm8k", "--methods", "kvarn_k5v5"]) == 2
    assert "method 'kvarn_k5v5' is unknown" in capsys.readouterr().err
    assert cli.main(["eval", "gsm8k", "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err


def test_assets_list_and_unknown_fetch(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KVARN_CACHE", str(tmp_path))
    assert cli.main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {tmp_path}" in out and "gemma-3-270m" in out and "hellaswag" in out
    assert cli.main(["assets", "fetch", "gsm8k", "wikitext-2"]) == 2  # checked before anything is downloaded
    assert "unknown asset 'wikitext-2'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_demo_quotes_the_stored_gpu_results():
    root = Path(__file__).resolve().parents[2]
    stored = root / demo.GPU_SPEED["source"]
    if not stored.exists():  # results reorganised: find the same run by its command
        found = [p for p in root.glob("benchmarks/**/*.json")
                 if demo.GPU_SPEED["command"] in p.read_text(errors="replace")]
        assert found, f"the stored GPU run quoted by the demo ({demo.GPU_SPEED['source']}) is gone"
        stored = found[0]
    data = json.loads(stored.read_text())
    assert data["setup"]["device"] == demo.GPU_SPEED["device"]
    assert data["setup"]["command"].endswith(demo.GPU_SPEED["command"])
    rows = {(r["method"], r["context"]): r for r in data["rows"] if r["batch"] == 1}
    for ctx, (dyn, kv, dyn_ms, kv_ms) in demo.GPU_SPEED["rows"].items():
        assert rows[("dynamic", ctx)]["decode_tokens_per_s"] == pytest.approx(dyn, abs=0.05)
        assert rows[("kvarn-k4v2_g128", ctx)]["decode_tokens_per_s"] == pytest.approx(kv, abs=0.05)
        assert rows[("dynamic", ctx)]["device_ms_per_step"] == pytest.approx(dyn_ms, abs=0.005)
        assert rows[("kvarn-k4v2_g128", ctx)]["device_ms_per_step"] == pytest.approx(kv_ms, abs=0.005)


def test_demo_table_on_cpu_shows_no_speed_race():
    row = {"bytes_per_token": 100.0, "kv_bytes": 2048, "ppl": 20.0, "prefill_s": 1.0, "decode_tps": 3.0, "text": "t"}
    result = {"device": "cpu", "dtype": "float32", "preset": "kvarn_k4v2_g128", "prompt_tokens": 700,
              "new_tokens": 48, "ppl_tokens": 1024, "chunk": 64, "identical_prefix": 48, "equal_tokens": 48,
              "seconds": 100.0, "rows": {"16-bit": {**row, "bytes_per_token": 400.0}, "kvarn_k4v2_g128": row}}
    cpu = demo.format_table(result)
    assert "decode tokens/s" not in cpu and demo.GPU_SPEED["device"] in cpu and "4.00x" in cpu
    gpu = demo.format_table({**result, "device": "cuda", "dtype": "bfloat16"})
    assert "decode tokens/s" in gpu and demo.GPU_SPEED["device"] not in gpu
