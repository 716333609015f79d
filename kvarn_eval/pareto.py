"""Pareto chart: accuracy against KV bytes per token (and against throughput where measured), one point per method."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results/eval"), help="folder of `kvarn eval` results")
    p.add_argument("--model", default="smollm2-135m", help="model whose results are drawn (a sub-folder)")
    p.add_argument("--out", type=Path, help="PNG path (default <results>/<model>/pareto.png)")


def main(args: argparse.Namespace) -> int:
    raise ValueError("not implemented yet")
