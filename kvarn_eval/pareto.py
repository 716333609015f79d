"""Pareto chart: each task's score against KV bytes per token, one point per method, and against decode throughput
where a stored benchmark measured the same method.

    kvarn pareto --results results/eval --model smollm2-135m        # -> results/eval/smollm2-135m/pareto.png

Points are the methods of `kvarn eval` result files (``<results>/<model>/<task>*.json``). The frontier joins the
methods no other method beats on both axes. Throughput comes from a `benchmarks/hf/bench_generate.py` result
(``--throughput``, default the stored H100 run), matched by method family; its device, model and context are written
on the panel, since they differ from the accuracy run's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FAMILY_COLORS = {"16-bit": "black", "kvarn": "tab:red", "kvarn-sim": "tab:red", "ablation": "tab:orange",
                 "kivi": "tab:blue", "quanto": "tab:green", "fp8": "tab:purple"}
# bench_generate method labels -> kvarn eval method names
BENCH_METHODS = {"dynamic": ("16-bit",), "kvarn-k4v2_g128": ("kvarn_k4v2_g128", "sim:kvarn_k4v2_g128"),
                 "quanto4": ("quanto-4bit",), "quanto2": ("quanto-2bit",)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results/eval"), help="folder of `kvarn eval` results")
    p.add_argument("--model", default="smollm2-135m", help="model whose results are drawn (a sub-folder)")
    p.add_argument("--throughput", type=Path, default=Path("benchmarks/hf/results/generate.json"),
                   help="bench_generate.py result with decode tokens/s (skipped when missing)")
    p.add_argument("--context", type=int, default=32768, help="context of the throughput rows (default 32768)")
    p.add_argument("--batch", type=int, default=8, help="batch of the throughput rows (default 8)")
    p.add_argument("--out", type=Path, help="PNG path (default <results>/<model>/pareto.png)")
    p.add_argument("--markdown", action="store_true", help="print each result as a Markdown table instead")


def frontier(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The non-dominated points (smaller x, better y), sorted by x."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not best or (y > best[-1][1] if higher_is_better else y < best[-1][1]):
            best.append((x, y))
    return best


def load_results(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "summary" in data and "task" in data:
            data["_path"] = str(path)
            out.append(data)
    return out


def _label(result: dict[str, Any]) -> str:
    n = next(iter(result["summary"].values()))["n"]
    metric = {"perplexity": "KL vs 16-bit (nats/token)", "gsm8k": "exact match",
              "humaneval": "pass@1", "mbpp": "pass@1", "needle": "retrieval accuracy"}.get(result["task"], "accuracy")
    return f"{result['task']} ({n} items): {metric}"


def throughput(path: Path, context: int, batch: int) -> tuple[dict[str, float], str] | None:
    """{kvarn eval method: decode tokens/s} from a bench_generate result, and a caption naming its setup."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    setup = data["setup"]
    speeds: dict[str, float] = {}
    for row in data["rows"]:
        if row.get("context") == context and row.get("batch") == batch and row["method"] in BENCH_METHODS:
            for name in BENCH_METHODS[row["method"]]:
                speeds[name] = row["decode_tokens_per_s"]
    model = setup.get("model", {}).get("model", "?")
    caption = (f"decode tok/s: {setup.get('device')}, {model} ({setup.get('model', {}).get('weights')} weights), "
               f"context {context // 1024}K x batch {batch}")
    return speeds, caption


def draw(results: list[dict[str, Any]], out: Path, speed: tuple[dict[str, float], str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no `kvarn eval` result files to draw")
    cols = 2 if speed else 1
    fig, axes = plt.subplots(len(results), cols, figsize=(7 * cols, 3.6 * len(results)), squeeze=False)
    for row, result in enumerate(results):
        hib = result.get("higher_is_better", True) and result["task"] != "perplexity"
        summary = result["summary"]
        for col in range(cols):
            ax = axes[row][col]
            pts = []
            for k, (name, s) in enumerate(summary.items()):
                if col == 0:
                    x = s["kv_bytes_per_token"] / 1024
                else:
                    assert speed is not None
                    if name not in speed[0]:
                        continue
                    x = speed[0][name]
                y = s["kl"] if result["task"] == "perplexity" else s["score"]
                pts.append((x, y))
                ax.scatter([x], [y], color=FAMILY_COLORS.get(s.get("family", ""), "gray"), zorder=3)
                ax.annotate(name, (x, y), fontsize=7, xytext=(4, 6 - 9 * (k % 3)), textcoords="offset points")
            if col == 0 and pts:
                f = frontier(pts, hib)
                ax.plot([p[0] for p in f], [p[1] for p in f], "--", color="gray", lw=1, zorder=2)
                ax.set_xlabel("KV bytes per token, all layers (KiB, 16-bit activations)")
            elif col == 1:
                ax.set_xscale("log")
                ax.set_xlabel(speed[1] if speed else "", fontsize=7)
            ax.set_ylabel(_label(result), fontsize=8)
            if result["task"] == "perplexity":
                ax.set_yscale("symlog", linthresh=1e-4)
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        env = result["environment"]
        axes[row][0].set_title(f"{result['model']} - {result['task']} - {env['device_name']}, "
                               f"{result.get('environment', {}).get('date', '')}", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """One result file as a Markdown table: method, score, KV bytes per token and the task's agreement columns."""
    extra = {"perplexity": [("ppl_delta_pct", "Δ ppl %", "{:+.2f}"), ("kl", "KL vs 16-bit", "{:.2e}"),
                            ("top1_agreement", "top-1 agree", "{:.1%}")],
             "needle": [("by_length", "by length", "{}")]}.get(result["task"])
    if extra is None and "same_choice_as_16bit" in next(iter(result["summary"].values())):
        extra = [("acc_norm", "acc_norm", "{:.3f}"), ("same_choice_as_16bit", "same choice as 16-bit", "{:.0%}"),
                 ("quantized_context_share", "context quantized", "{:.0%}")]
    if extra is None:
        extra = [("same_completion_as_16bit", "same output as 16-bit", "{:.0%}"),
                 ("mean_new_tokens", "tokens generated", "{:.0f}"),
                 ("quantized_share", "gen. tokens reading quantized KV", "{:.0%}")]
    head = ["method", "score", "KV B/token", "bits/elem", *(title for _, title, _ in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in result["summary"].items():
        cells = [name, f"{s['score']:.4g}", f"{s['kv_bytes_per_token']:,.0f}", f"{s['bits_per_element']:.2f}"]
        for key, _, fmt in extra:
            value = s.get(key)
            cells.append("—" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.markdown:
        for result in load_results(args.results / args.model):
            n = next(iter(result["summary"].values()))["n"]
            env = result["environment"]
            unit = "tokens" if result["task"] == "perplexity" else "items"
            print(f"**{result['task']}** — {n} {unit}, {env['device_name']}, torch {env['torch']}, "
                  f"transformers {env['transformers']}, commit {env['git_commit']}; `{result.get('command')}`\n")
            print(markdown_table(result) + "\n")
        return 0
    folder = args.results / args.model
    results = load_results(folder)
    if not results:
        raise ValueError(f"no `kvarn eval` result files in {folder}: run `kvarn eval TASK --model {args.model}` first")
    speed = throughput(args.throughput, args.context, args.batch)
    out = draw(results, args.out or folder / "pareto.png", speed)
    print(f"wrote {out}")
    return 0
