"""Quality of KVarN against KIVI-style RTN at the same bits: reconstruction and attention-output error.

Compared, per bit configuration (k4v2_g128, k4v4_g128, k2v2_g128, k4v2_g64):

- ``kvarn``: the shipped algorithm through the kernel core's quantizer (``codecs.kvarn_codec``:
  ``quantize_tile_records`` then ``dequantize_tiles``), scales stored as 16-bit in the record (float16 by default);
- ``kivi``: KIVI-style min-max RTN (``codecs.kivi_codec``): keys per channel over the tile, values per token,
  no rotation, no normalization, float32 scales;
- ablations (``codecs.kvarn_variant_codec``), each built from the same quantizer steps with float32 scales:
  ``abl-rot-only`` (Hadamard rotation, then the same per-row RTN, no normalization),
  ``abl-norm-only`` (variance normalization and RTN on the unrotated tile: ``codec.quantize_matrices``) and
  ``abl-rot+norm-fp32`` (rotation + normalization + RTN with float32 scales: KVarN's math without the 16-bit
  scale storage, so the ablation ladder compares like with like; K's frame is chosen per tile as in KVarN);
- ``kvarn-v1``: format version 1, K always rotated (``quantize_tile_records(..., rotate_k=True)``), to show what the
  per-tile K-frame choice of version 2 changes.

Every method quantizes the same tokens: the first 128 tokens of a sequence stay 16-bit (KVarN's sink; the same
128 for the g64 configuration so that all methods are measured on the same tokens), then whole tiles up to the
last full 128-token boundary; the rest is a 16-bit tail.

Metrics (float32, CPU), per (layer, KV head) for reconstruction and per (layer, query head) for attention, then
averaged over layers and heads:

- ``k_rel_err`` / ``v_rel_err``: relative Frobenius error ||X_hat - X|| / ||X|| over the quantized tokens;
- ``attn_rel_err``: relative Frobenius error of the attention output of sampled queries (the real captured
  queries for models, Gaussian queries for synthetic data). Decode-faithful causal view: the query at position t
  attends to keys 0..t; a key is read quantized when its tile is complete before t (tile end <= t) and lies after
  the sink, otherwise in 16-bit. Queries are evenly spaced over [256, L), so each sees at least one quantized tile;
- ``attn_kl``: KL(P_exact || P_quantized) of those queries' attention distributions, in nats, averaged.

Run ``kvarn quality`` (or ``python -m kvarn_eval.quality``) to write reports/quality/quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvarn_kernels import PRESETS
from kvarn_kernels.reference import synthetic_kv

from .codecs import TileCodec, kivi_codec, kvarn_codec, kvarn_variant_codec

REPORT_VERSION = 1
SINK = 128  # tokens kept in 16-bit at the start of every sequence, for every method
ALIGN = 128  # the quantized region ends on a multiple of this many tokens after the sink
CONFIGS = ("k4v2_g128", "k4v4_g128", "k2v2_g128", "k4v2_g64")
METHODS = ("kvarn", "kivi", "abl-rot-only", "abl-norm-only", "abl-rot+norm-fp32", "kvarn-v1")
METHOD_TITLES = {
    "kvarn": "KVarN (rotation + normalization, 16-bit scales)",
    "kivi": "KIVI-style RTN (K per channel, V per token)",
    "abl-rot-only": "ablation: Hadamard rotation + RTN, no normalization",
    "abl-norm-only": "ablation: normalization + RTN, no rotation",
    "abl-rot+norm-fp32": "ablation: rotation + normalization + RTN, float32 scales",
    "kvarn-v1": "KVarN format v1: K always rotated (16-bit scales)",
}
METRICS = ("k_rel_err", "v_rel_err", "attn_rel_err", "attn_kl")
METRIC_TITLES = {
    "k_rel_err": "K rel. error",
    "v_rel_err": "V rel. error",
    "attn_rel_err": "attn-output rel. error",
    "attn_kl": "attention KL (nats)",
}
SYNTHETIC = ("synthetic-outliers", "synthetic-gaussian", "synthetic-student-t")
DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")

# --- methods: tiles k, v [N, H, G, D] (original frame) -> float32 reconstructions, original frame ---------------
def config_bits(config: str) -> tuple[int, int, int]:
    """(k_bits, v_bits, group) of a configuration name such as ``k4v2_g128``."""
    preset = f"kvarn_{config}"
    if preset not in PRESETS:
        raise ValueError(f"configuration {config!r} is unknown: use one of {', '.join(p[6:] for p in PRESETS)}")
    return PRESETS[preset]


def make_codec(method: str, config: str, scale_dtype: torch.dtype = torch.float16) -> TileCodec:
    """The quantize-dequantize round trip of `method` at `config` (see the module docstring), float32 in and out.

    scale_dtype: the activation dtype whose format the ``kvarn`` methods use (its 16-bit scale dtype)."""
    kb, vb, _ = config_bits(config)
    preset = f"kvarn_{config}"
    f32 = torch.float32
    codecs: dict[str, TileCodec] = {
        "kvarn": kvarn_codec(preset, scale_dtype),
        "kivi": kivi_codec(kb, vb, scale_dtype=f32),
        "abl-rot-only": kvarn_variant_codec(kb, vb, iters=0, scale_dtype=f32, rotate_k=True),
        "abl-norm-only": kvarn_variant_codec(kb, vb, rotate=False, scale_dtype=f32),
        "abl-rot+norm-fp32": kvarn_variant_codec(kb, vb, scale_dtype=f32),
        "kvarn-v1": kvarn_codec(preset, scale_dtype, rotate_k=True),
    }
    if method not in codecs:
        raise ValueError(f"method {method!r} is unknown: use one of {', '.join(codecs)}")
    codec = codecs[method]
    return lambda k, v: codec(k.float(), v.float())


@dataclass(frozen=True)
class Method:
    """One row of the report: a method at a bit configuration."""

    name: str
    config: str

    @property
    def label(self) -> str:
        return f"{self.name}:{self.config}"

    @property
    def group(self) -> int:
        return config_bits(self.config)[2]


def all_methods(configs: Sequence[str] = CONFIGS, ablation_configs: Sequence[str] | None = None) -> list[Method]:
    """KVarN and KIVI at every configuration; the ablations at `ablation_configs` (default: all of `configs`)."""
    abl = configs if ablation_configs is None else ablation_configs
    return [Method(m, c) for c in configs for m in METHODS if not m.startswith("abl-") or c in abl]


# --- evaluation of one layer ------------------------------------------------------------------------------------
def quant_end(length: int) -> int:
    """End of the quantized region [SINK, end) of a sequence of `length` tokens."""
    return SINK + max(length - SINK, 0) // ALIGN * ALIGN


def query_positions(length: int, count: int) -> torch.Tensor:
    """`count` positions evenly spaced over [2*SINK, length): each sees at least one complete quantized tile."""
    lo = 2 * SINK
    if length <= lo:
        raise ValueError(f"sequences need more than {lo} tokens to have a quantized tile, got {length}")
    return torch.linspace(lo, length - 1, min(count, length - lo)).round().long().unique()


def _to_tiles(x: torch.Tensor, end: int, group: int) -> torch.Tensor:
    h, _, d = x.shape
    return x[:, SINK:end].reshape(h, -1, group, d).transpose(0, 1)  # [N, H, G, D]


def _from_tiles(x: torch.Tensor) -> torch.Tensor:
    n, h, g, d = x.shape
    return x.transpose(0, 1).reshape(h, n * g, d)


def evaluate_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    methods: Sequence[Method],
    positions: torch.Tensor,
    scaling: float | None = None,
    codecs: dict[str, TileCodec] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Errors of each method on one layer: q [Hq, L, D], k, v [H, L, D] (Hq a multiple of H, GQA grouping).

    Returns {label: {"k_rel_err": [H], "v_rel_err": [H], "attn_rel_err": [Hq], "attn_kl": [Hq]}}.
    `codecs` maps labels to codecs (default: `make_codec` of each method).
    """
    q, k, v = q.float(), k.float(), v.float()
    hq, length, d = q.shape
    h = k.shape[0]
    if hq % h or k.shape != v.shape or k.shape[1] != length or k.shape[2] != d:
        raise ValueError(f"expected q [Hq, L, D] and k, v [H, L, D] with H | Hq: {q.shape}, {k.shape}, {v.shape}")
    rep = hq // h
    scale = d**-0.5 if scaling is None else scaling
    end = quant_end(length)
    pos = positions.long()
    nq = pos.numel()
    qs = q[:, pos].reshape(h, rep * nq, d)  # query head h*rep + r uses KV head h

    j = torch.arange(length)
    causal = j[None, :] <= pos[:, None]  # [Q, L]
    scores = (qs @ k.transpose(1, 2) * scale).reshape(h, rep, nq, length).masked_fill(~causal, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    p = logp.exp()
    out = p.reshape(h, rep * nq, length) @ v  # [H, rep*Q, D]
    out_norm = out.reshape(h, rep, nq, d).square().sum((-1, -2)).sqrt().reshape(hq)
    k_norm = k[:, SINK:end].square().sum((-1, -2)).sqrt()
    v_norm = v[:, SINK:end].square().sum((-1, -2)).sqrt()

    results: dict[str, dict[str, torch.Tensor]] = {}
    for m in methods:
        codec = codecs[m.label] if codecs is not None else make_codec(m.name, m.config)
        g = m.group
        k_t, v_t = _to_tiles(k, end, g), _to_tiles(v, end, g)
        k_hat, v_hat = codec(k_t, v_t)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dk[:, SINK:end] = _from_tiles(k_hat.float() - k_t)
        dv[:, SINK:end] = _from_tiles(v_hat.float() - v_t)
        tile_end = (j // g + 1) * g
        use_q = ((j >= SINK) & (j < end))[None, :] & (tile_end[None, :] <= pos[:, None])  # [Q, L]
        d_scores = (qs @ dk.transpose(1, 2) * scale).reshape(h, rep, nq, length)
        logp_hat = torch.log_softmax(scores + d_scores * use_q, dim=-1)
        p_hat = logp_hat.exp()
        out_hat = p_hat.reshape(h, rep * nq, length) @ v + (p_hat * use_q).reshape(h, rep * nq, length) @ dv
        kl = torch.where(causal, p * (logp - logp_hat), torch.zeros(())).sum(-1)  # [H, rep, Q]
        attn_err = (out_hat - out).reshape(h, rep, nq, d).square().sum((-1, -2)).sqrt().reshape(hq)
        results[m.label] = {
            "k_rel_err": dk[:, SINK:end].square().sum((-1, -2)).sqrt() / k_norm,
            "v_rel_err": dv[:, SINK:end].square().sum((-1, -2)).sqrt() / v_norm,
            "attn_rel_err": attn_err / out_norm,
            "attn_kl": kl.mean(-1).reshape(hq),
        }
    return results


def key_query_diagnostics(q: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    """Statistics of one layer that predict when rotation helps or hurts (means over KV heads).

    - ``key_std_max_over_median``: max / median over channels of the per-channel key std (over tokens after the
      sink): how uneven the key channels are.
    - ``query_key_alignment`` rho = sqrt(E[sum_c q_c^2 s_c^2]) / (sqrt(E[|q|^2]) * sqrt(mean_c s_c^2)), s_c the key
      std of channel c, over the queries after the sink. Per-channel RTN leaves score errors that scale like
      sum_c q_c^2 s_c^2; after rotation every channel has variance ~ mean_c s_c^2, so score errors scale like
      |q|^2 mean_c s_c^2; rho^2 is roughly their ratio. rho < 1: queries live on quiet key channels, which
      per-channel RTN quantizes finely and rotation floods with the loud channels' error.
    """
    h, rep = k.shape[0], q.shape[0] // k.shape[0]
    s = k[:, SINK:].float().std(1)  # [H, D]
    q2 = q[:, SINK:].float().square().reshape(h, rep, -1, q.shape[-1])  # [H, rep, T, D]
    num = (q2 * s[:, None, None].square()).sum(-1).mean((1, 2)).sqrt()
    den = q2.sum(-1).mean((1, 2)).sqrt() * s.square().mean(-1).sqrt()
    return {
        "key_std_max_over_median": float((s.amax(-1) / s.median(-1).values).mean()),
        "query_key_alignment": float((num / den).mean()),
    }


def aggregate(per_layer: list[dict[str, dict[str, torch.Tensor]]]) -> tuple[dict, dict]:
    """(mean over all layers and heads, per-layer means over heads) of each method's metrics."""
    labels = list(per_layer[0])
    summary = {
        lab: {mt: float(torch.cat([r[lab][mt] for r in per_layer]).mean()) for mt in METRICS} for lab in labels
    }
    layers = {lab: {mt: [float(r[lab][mt].mean()) for r in per_layer] for mt in METRICS} for lab in labels}
    return summary, layers


def improvement(summary: dict[str, dict[str, float]], configs: Sequence[str]) -> dict[str, dict[str, float]]:
    """KIVI error / KVarN error per configuration and metric (> 1: KVarN is better)."""
    out = {}
    for c in configs:
        kv, ki = summary.get(f"kvarn:{c}"), summary.get(f"kivi:{c}")
        if kv and ki:
            out[c] = {mt: ki[mt] / kv[mt] if kv[mt] > 0 else math.inf for mt in METRICS}
    return out


# --- data -------------------------------------------------------------------------------------------------------
def synthetic_data(
    kind: str, length: int, num_kv_heads: int, num_q_heads: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (q [Hq, L, D], k, v [H, L, D]) float32; queries are standard Gaussian in every variant.

    - ``synthetic-outliers``: `testing.synthetic_kv` (key channels with large offsets/spread, value spikes);
    - ``synthetic-gaussian``: i.i.d. standard normal K and V (a control with nothing to exploit);
    - ``synthetic-student-t``: i.i.d. Student-t with 3 degrees of freedom (heavy tails, no structure).
    """
    g = torch.Generator().manual_seed(seed + 1000)
    q = torch.randn(num_q_heads, length, head_dim, generator=g)
    shape = (length, num_kv_heads, head_dim)
    if kind == "synthetic-outliers":
        k, v = synthetic_kv(length, num_kv_heads, head_dim, torch.float32, seed=seed)
    elif kind == "synthetic-gaussian":
        k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    elif kind == "synthetic-student-t":
        k, v = _student_t(shape, 3, g), _student_t(shape, 3, g)
    else:
        raise ValueError(f"synthetic data {kind!r} is unknown: use one of {', '.join(SYNTHETIC)}")
    return q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()


def _student_t(shape: tuple[int, ...], dof: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, dof), generator=g).square().sum(-1)
    return z / (chi2 / dof).sqrt()


_CAPTURE: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:  # fmt: skip
    """Record post-RoPE (q, k, v) of batch row 0 and the softmax scaling per layer, then run sdpa attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    _CAPTURE[int(module.layer_idx)] = (
        query[0].detach().float().clone(), key[0].detach().float().clone(), value[0].detach().float().clone(),
        float(scaling),
    )  # fmt: skip
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> str:
    """Register the capturing attention function with transformers; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register("kvarn_capture", _capture_attention)
    return "kvarn_capture"


def capture_model(model_name: str, tokens: int, text: str = "pg-essays") -> tuple[list[tuple], dict[str, Any]]:
    """Run `model_name` (float32, CPU) over the first `tokens` tokens of `text`; per-layer (q, k, v, scaling)."""
    from . import assets

    model, tok = assets.load_model(model_name, torch.float32, "cpu", attn_implementation=register_capture())
    body = assets.fetch_text(text)
    ids = tok(body[: tokens * 12], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"text {text!r} has only {ids.shape[1]} tokens, {tokens} requested")
    _CAPTURE.clear()
    with torch.inference_mode():
        model.base_model(input_ids=ids, use_cache=False)  # the decoder only: the LM head is not needed
    layers = [_CAPTURE[i] for i in sorted(_CAPTURE)]
    _CAPTURE.clear()
    cfg = model.config
    meta = {
        "model": model_name, "text": text, "tokens": int(ids.shape[1]), "num_layers": len(layers),
        "num_q_heads": int(cfg.num_attention_heads), "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": int(layers[0][1].shape[-1]), "dtype": "float32",
    }  # fmt: skip
    del model
    return layers, meta


# --- running ----------------------------------------------------------------------------------------------------
def run_synthetic(
    kinds: Sequence[str],
    methods: Sequence[Method],
    length: int,
    num_kv_heads: int,
    num_q_heads: int,
    head_dim: int,
    queries: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    from tqdm.auto import tqdm

    out = {}
    for kind in tqdm(kinds, desc="synthetic", disable=not progress):
        q, k, v = synthetic_data(kind, length, num_kv_heads, num_q_heads, head_dim, seed)
        res = evaluate_layer(q, k, v, methods, query_positions(length, queries))
        summary, _ = aggregate([res])
        out[kind] = {
            "diagnostics": key_query_diagnostics(q, k),
            "kind": "synthetic",
            "setup": {"tokens": length, "num_kv_heads": num_kv_heads, "num_q_heads": num_q_heads,
                      "head_dim": head_dim, "queries_per_head": int(query_positions(length, queries).numel()),
                      "seed": seed},  # fmt: skip
            "results": summary,
        }
    return out


def run_model(
    model_name: str,
    methods: Sequence[Method],
    tokens: int,
    queries: int,
    layer_stride: int = 1,
    text: str = "pg-essays",
    progress: bool = True,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layers, meta = capture_model(model_name, tokens, text)
    t_capture = time.perf_counter() - t0
    chosen = list(range(0, len(layers), layer_stride))
    pos = query_positions(meta["tokens"], queries)
    per_layer, diags = [], []
    for i in tqdm(chosen, desc=f"{model_name} layers", disable=not progress):
        q, k, v, scaling = layers[i]
        per_layer.append(evaluate_layer(q, k, v, methods, pos, scaling))
        diags.append(key_query_diagnostics(q, k))
    summary, by_layer = aggregate(per_layer)
    t_eval = time.perf_counter() - t0 - t_capture
    meta.update({"layers_evaluated": chosen, "queries_per_head": int(pos.numel()),
                 "capture_s": round(t_capture, 2), "evaluate_s": round(t_eval, 2)})  # fmt: skip
    diagnostics = {name: [d[name] for d in diags] for name in diags[0]}
    return {"kind": "model", "setup": meta, "results": summary, "per_layer": by_layer,
            "per_layer_diagnostics": diagnostics}  # fmt: skip


def build_report(datasets: dict[str, dict[str, Any]], configs: Sequence[str], command: str,
                 setup: dict[str, Any], runtime_s: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """The JSON document: setup, the exact command, runtimes and per-dataset results with improvement factors."""
    for ds in datasets.values():
        ds["improvement_kivi_over_kvarn"] = improvement(ds["results"], configs)
    return {
        "report": "kvarn-quality",
        "version": REPORT_VERSION,
        "command": command,
        "setup": setup,
        "methods": METHOD_TITLES,
        "metrics": METRIC_TITLES,
        "configs": list(configs),
        "runtime_s": runtime_s,
        "datasets": datasets,
    }


def write_json(report: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    return path


# --- markdown and plot ------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 0.01:
        return f"{x:.4f}"
    return f"{x:.2e}"


def _factor(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _pair(kvarn: float, kivi: float) -> str:
    return f"{_fmt(kvarn)} / {_fmt(kivi)} ({_factor(kivi / kvarn)})" if kvarn > 0 else f"0 / {_fmt(kivi)}"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: headline, findings, every method with ablations, per-layer tables."""
    configs = report["configs"]
    ds_all = report["datasets"]
    lines = [
        "# KVarN vs KIVI-style RTN: reconstruction and attention error",
        "",
        f"Generated by `{report['command']}` (total {report['runtime_s'].get('total', 0):.0f} s on "
        f"{report['setup'].get('threads', '?')} CPU thread(s)).",
        "",
        "All methods quantize the same tokens at the same bits: tokens [128, L') in whole tiles (L' = last full",
        "128-token boundary); the first 128 tokens (KVarN's sink, also for g64) and the tail stay 16-bit.",
        "Errors are relative Frobenius errors over the quantized tokens, averaged over (layer, head). Attention is",
        "decode-faithful and causal: each sampled query (evenly spaced over [256, L)) attends to its whole prefix,",
        "reading a key/value quantized when its tile is complete before the query and after the sink, 16-bit",
        "otherwise. Real models use their own captured post-RoPE queries; synthetic data uses Gaussian queries.",
        "KL is KL(P_exact || P_quantized) of the attention distribution in nats. Factor = KIVI error / KVarN error",
        f"(> 1: KVarN is better). KVarN stores its scales in {report['setup'].get('kvarn_scale_dtype')}; the KIVI",
        "baseline and the ablations keep float32 scales (this slightly favours them).",
        "",
        "## Headline: KVarN vs KIVI-style RTN at the same bits",
        "",
        "Cells: KVarN / KIVI (factor).",
        "",
        "| data | config | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for name, ds in ds_all.items():
        res = ds["results"]
        for c in configs:
            if c in ds["improvement_kivi_over_kvarn"]:
                cells = [_pair(res[f"kvarn:{c}"][m], res[f"kivi:{c}"][m]) for m in METRICS]
                lines.append(f"| {name} | {c} | " + " | ".join(cells) + " |")
    lines += ["", "## Findings (computed from the numbers in this report)", ""]
    lines += _findings(report)
    lines += [
        "",
        "Diagnostics: `key_std_max_over_median` is max / median over channels of the per-channel key std;",
        "`query_key_alignment` rho = sqrt(E[sum_c q_c² s_c²]) / (sqrt(E[|q|²]) · rms_c s_c), s_c the key std of",
        "channel c. Per-channel RTN leaves score errors that scale like sum_c q_c² s_c²; after the Hadamard rotation",
        "every channel carries about the mean variance, so score errors scale like |q|² · mean_c s_c². rho < 1 means",
        "the queries live on quiet key channels, which per-channel RTN quantizes finely and rotation floods with the",
        "loud channels' error (means over KV heads).",
        "",
        "## All methods, with ablations",
        "",
    ]
    lines += [f"- `{k}`: {v}" for k, v in report["methods"].items()]
    for name, ds in ds_all.items():
        lines += ["", f"### {name}", "", _setup_line(ds), ""]
        lines += ["| method | config | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]  # fmt: skip
        for label, vals in ds["results"].items():
            meth, cfg = label.split(":")
            shown = f"**{meth}**" if meth == "kvarn" else meth
            lines.append(f"| {shown} | {cfg} | " + " | ".join(_fmt(vals[m]) for m in METRICS) + " |")
    for name, ds in ds_all.items():
        if "per_layer" not in ds or f"kvarn:{configs[0]}" not in ds["per_layer"]:
            continue
        c = configs[0]
        kv, ki = ds["per_layer"][f"kvarn:{c}"], ds["per_layer"][f"kivi:{c}"]
        diag = ds.get("per_layer_diagnostics", {})
        lines += ["", f"### {name}: per layer, {c} (KVarN / KIVI (factor), mean over heads)", ""]
        lines += ["| layer | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " | key std max/med | rho |",
                  "|---|" + "---|" * (len(METRICS) + 2)]  # fmt: skip
        for i, layer in enumerate(ds["setup"]["layers_evaluated"]):
            cells = [_pair(kv[m][i], ki[m][i]) for m in METRICS]
            cells += [f"{diag[d][i]:.1f}" if d.startswith("key") else f"{diag[d][i]:.2f}" for d in diag]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", f"Setup: `{json.dumps(report['setup'])}`", ""]
    return "\n".join(lines)


def _setup_line(ds: dict[str, Any]) -> str:
    s = ds["setup"]
    if ds["kind"] == "model":
        n_layers = len(s["layers_evaluated"])
        return (f"{s['model']} on {s['tokens']} tokens of `{s['text']}`: {n_layers} of {s['num_layers']} layers, "
                f"{s['num_kv_heads']} KV / {s['num_q_heads']} query heads, head_dim {s['head_dim']}, "
                f"{s['queries_per_head']} queries per head (capture {s['capture_s']} s, "
                f"evaluation {s['evaluate_s']} s).")  # fmt: skip
    d = ds.get("diagnostics", {})
    diag = ", ".join(f"{k} {v:.2f}" for k, v in d.items())
    return (f"{s['tokens']} tokens, {s['num_kv_heads']} KV / {s['num_q_heads']} query heads, head_dim "
            f"{s['head_dim']}, {s['queries_per_head']} queries per head, seed {s['seed']}; {diag}.")  # fmt: skip


def _findings(report: dict[str, Any]) -> list[str]:
    out = []
    c = report["configs"][0]
    for name, ds in report["datasets"].items():
        res, imp = ds["results"], ds["improvement_kivi_over_kvarn"]
        if c not in imp:
            continue
        f = imp[c]
        worse = [METRIC_TITLES[m] for m in METRICS if f[m] < 1]
        out.append(f"- **{name}**, {c}: KIVI / KVarN error = {_factor(f['k_rel_err'])} (K), "
                   f"{_factor(f['v_rel_err'])} (V), {_factor(f['attn_rel_err'])} (attention output), "
                   f"{_factor(f['attn_kl'])} (KL)."
                   + (f" **KVarN is worse on: {', '.join(worse)}.**" if worse else ""))  # fmt: skip
        if "per_layer" in ds:
            kv, ki = ds["per_layer"][f"kvarn:{c}"], ds["per_layer"][f"kivi:{c}"]
            layers = ds["setup"]["layers_evaluated"]
            wins = {m: sum(a < b for a, b in zip(kv[m], ki[m], strict=True)) for m in METRICS}
            out.append("  - layers where KVarN beats KIVI: " + ", ".join(
                f"{METRIC_TITLES[m]} {wins[m]}/{len(layers)}" for m in METRICS) + ".")  # fmt: skip
            ratio = [b / a if a > 0 else math.inf for a, b in zip(kv["attn_kl"], ki["attn_kl"], strict=True)]
            i = min(range(len(ratio)), key=ratio.__getitem__)
            rho = ds.get("per_layer_diagnostics", {}).get("query_key_alignment")
            extra = f", rho {rho[i]:.2f}" if rho else ""
            out.append(f"  - worst layer for KVarN (KL): layer {layers[i]}, KL {_fmt(kv['attn_kl'][i])} vs KIVI "
                       f"{_fmt(ki['attn_kl'][i])}, attention-output error {_fmt(kv['attn_rel_err'][i])} vs "
                       f"{_fmt(ki['attn_rel_err'][i])}{extra}.")  # fmt: skip
            if rho:
                won = [r for r, x in zip(rho, ratio, strict=True) if x >= 1]
                lost = [r for r, x in zip(rho, ratio, strict=True) if x < 1]
                if won and lost:
                    out.append(f"  - mean rho of layers where KVarN's KL is lower: {sum(won) / len(won):.2f}; "
                               f"where it is higher: {sum(lost) / len(lost):.2f}.")  # fmt: skip
        labels = {m: f"{m}:{c}" for m in ("kivi", "abl-rot-only", "abl-norm-only", "abl-rot+norm-fp32", "kvarn",
                                           "kvarn-v1")}
        if not all(lab in res for lab in labels.values()):
            continue
        for metric in METRICS:
            a = {m: res[lab][metric] for m, lab in labels.items()}
            out.append(f"  - {METRIC_TITLES[metric]}: KIVI {_fmt(a['kivi'])}; rotation only "
                       f"{_fmt(a['abl-rot-only'])}; normalization only {_fmt(a['abl-norm-only'])}; rotation "
                       f"(K: per-tile frame) + normalization {_fmt(a['abl-rot+norm-fp32'])} (fp32 scales) / "
                       f"{_fmt(a['kvarn'])} (KVarN, 16-bit scales); format v1 (K always rotated) "
                       f"{_fmt(a['kvarn-v1'])}. Full KVarN (fp32 scales) vs rotation only: "
                       f"{_factor(a['abl-rot-only'] / a['abl-rot+norm-fp32'])}.")  # fmt: skip
    return out


def plot(report: dict[str, Any], path: Path | str, config: str | None = None) -> Path:
    """Grouped bars (log scale): each metric per dataset, for KIVI, the ablations and KVarN at `config`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = config or report["configs"][0]
    names = list(report["datasets"])
    order = ["kivi", "abl-rot-only", "abl-norm-only", "kvarn"]
    colors = {"kivi": "#c44e52", "abl-rot-only": "#dd8452", "abl-norm-only": "#8172b3", "kvarn": "#4c72b0"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    width = 0.8 / len(order)
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        for i, m in enumerate(order):
            vals = [report["datasets"][n]["results"].get(f"{m}:{config}", {}).get(metric, float("nan")) for n in names]
            xs = [x + (i - (len(order) - 1) / 2) * width for x in range(len(names))]
            ax.bar(xs, vals, width, label=m, color=colors[m])
        ax.set_yscale("log")
        ax.set_title(f"{METRIC_TITLES[metric]} ({config})")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("synthetic-", "syn-") for n in names], rotation=20, fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("KVarN vs KIVI-style RTN and ablations at the same bits (lower is better)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- CLI --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvarn quality", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/quality", help="output folder (quality.json, .md, .png)")
    ap.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help="real models ('none' to skip)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of real text per model")
    ap.add_argument("--text", default="pg-essays", choices=["pg-essays", "wiki"])
    ap.add_argument("--queries", type=int, default=256, help="sampled query positions per head")
    ap.add_argument("--layer-stride", type=int, default=1, help="evaluate every n-th layer of the real models")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--ablation-configs", nargs="*", default=["k4v2_g128", "k2v2_g128"], choices=list(CONFIGS),
                    help="configurations that also get the ablation rows")
    ap.add_argument("--synthetic-tokens", type=int, default=2048)
    ap.add_argument("--synthetic-heads", type=int, nargs=2, default=[8, 16], metavar=("KV", "Q"))
    ap.add_argument("--synthetic-head-dim", type=int, default=128, choices=[64, 128, 256])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the normalization's many small reductions slow down "
                         "badly with 2 threads on a machine whose other core is busy; 0 = torch's choice)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1024 tokens, 64 queries, every 3rd layer")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `kvarn quality -- --out ...`: the separator some argparse front-ends need
        argv = argv[1:]
    prog = "python -m kvarn_eval.quality" if Path(sys.argv[0]).name == "quality.py" else "kvarn quality"
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.synthetic_tokens, args.queries = min(args.tokens, 1024), min(args.synthetic_tokens, 1024), 64
        args.layer_stride = max(args.layer_stride, 3)
    models = [m for m in args.models if m != "none"]
    progress = not args.no_progress
    methods = all_methods(args.configs, [c for c in args.ablation_configs if c in args.configs])
    t0 = time.perf_counter()
    runtime: dict[str, float] = {}
    datasets = run_synthetic(SYNTHETIC, methods, args.synthetic_tokens, *args.synthetic_heads,
                             args.synthetic_head_dim, args.queries, args.seed, progress)  # fmt: skip
    runtime["synthetic"] = round(time.perf_counter() - t0, 2)
    for name in models:
        t1 = time.perf_counter()
        datasets[f"model-{name}"] = run_model(name, methods, args.tokens, args.queries, args.layer_stride,
                                              args.text, progress)  # fmt: skip
        runtime[f"model-{name}"] = round(time.perf_counter() - t1, 2)
    runtime["total"] = round(time.perf_counter() - t0, 2)
    import transformers

    setup = {
        "sink_tokens": SINK, "quantized_region_alignment": ALIGN, "kvarn_scale_dtype": "float16",
        "baseline_scale_dtype": "float32", "compute_dtype": "float32", "device": "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "query_sampling": "evenly spaced over [256, L), causal, decode-faithful",
        "aggregation": "mean over (layer, head) of per-head relative errors; KL mean over (layer, head, query)",
        "quick": args.quick,
    }  # fmt: skip
    report = build_report(datasets, args.configs, f"{prog} {shlex.join(argv)}", setup, runtime)
    out = Path(args.out)
    write_json(report, out / "quality.json")
    (out / "quality.md").write_text(render_markdown(report))
    plot(report, out / "quality.png")
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'} in {runtime['total']:.0f} s")
    for name, ds in datasets.items():
        for c, f in ds["improvement_kivi_over_kvarn"].items():
            print(f"  {name:<28} {c:<10} " + "  ".join(f"{m} {f[m]:.2f}x" for m in METRICS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
