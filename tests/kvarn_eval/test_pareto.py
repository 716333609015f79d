"""kvarn_eval.pareto: the frontier, the chart file and the Markdown tables from result files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvarn_eval import pareto


def test_frontier_keeps_only_undominated_points():
    pts = [(5.0, 0.50), (23.0, 0.52), (3.4, 0.30), (6.5, 0.45), (5.0, 0.40), (11.0, 0.51)]
    assert pareto.frontier(pts, higher_is_better=True) == [(3.4, 0.30), (5.0, 0.50), (11.0, 0.51), (23.0, 0.52)]
    kl = [(5.0, 0.007), (3.6, 2.4), (3.4, 0.14), (4.9, 0.012), (23.0, 0.0)]
    assert pareto.frontier(kl, higher_is_better=False) == [(3.4, 0.14), (4.9, 0.012), (5.0, 0.007), (23.0, 0.0)]


def _result(task: str, scores: dict[str, tuple[float, float, str]]) -> dict:
    return {"task": task, "model": "m", "higher_is_better": task != "perplexity", "limit": 3, "command": "kvarn eval x",
            "environment": {"device_name": "cpu", "date": "2026-12-07", "torch": "2.13", "transformers": "5.23",
                            "git_commit": "abc"},
            "summary": {name: {"score": s, "kl": s, "n": 3, "kv_bytes_per_token": b, "bits_per_element": b / 1440,
                               "family": fam, "ppl_delta_pct": 0.0, "top1_agreement": 1.0}
                        for name, (s, b, fam) in scores.items()}}


def test_chart_and_markdown_from_result_files(tmp_path: Path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    scores = {"16-bit": (0.5, 23040.0, "16-bit"), "kvarn_k4v2_g128": (0.5, 5130.0, "kvarn"),
              "quanto-4bit": (0.4, 6480.0, "quanto")}
    (folder / "gsm8k.json").write_text(json.dumps(_result("gsm8k", scores)))
    (folder / "notes.json").write_text("[1, 2]")  # not a result file: skipped
    bench = tmp_path / "generate.json"
    bench.write_text(json.dumps({"setup": {"device": "H100", "model": {"model": "q", "weights": "random"}},
                                 "rows": [{"method": "dynamic", "context": 32768, "batch": 8,
                                           "decode_tokens_per_s": 82},
                                          {"method": "quanto4", "context": 32768, "batch": 8,
                                           "decode_tokens_per_s": 165}]}))
    args = argparse.Namespace(results=tmp_path, model="m", throughput=bench, context=32768, batch=8, out=None,
                              markdown=False)
    assert pareto.main(args) == 0
    png = folder / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    speeds, caption = pareto.throughput(bench, 32768, 8)
    assert speeds == {"16-bit": 82, "quanto-4bit": 165} and "H100" in caption and "32K x batch 8" in caption
    args.markdown = True
    assert pareto.main(args) == 0
    out = capsys.readouterr().out
    assert "**gsm8k** — 3 items, cpu" in out and "`kvarn eval x`" in out
    assert "| kvarn_k4v2_g128 | 0.5 | 5,130 | 3.56 |" in out
