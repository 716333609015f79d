"""Should a K tile be Hadamard-rotated? A calibration-free, per-(tile, KV head) choice, and its validation.

Problem (reports/quality): on Qwen2.5-Coder-0.5B, KVarN's attention KL is 26× KIVI's, almost all from layer 0.
Qwen2.5's large key biases, after RoPE, make a few key channel pairs swing with a huge amplitude over the
positions of a tile. Per-channel RTN (KIVI) gives those loud channels their own range; the Hadamard rotation
spreads their energy into every channel, so every channel's range (and rounding error) is set by the loud ones,
and the quiet channels the queries actually read are quantized coarsely.

The rule recommended here (`choose_k_rotation`): per (tile, KV head), rotate K only when the rotation shrinks
the summed squared per-channel ranges of the tile, i.e. the predicted min-max RTN error,

    rotate  <=>  sum_d (max_t kH[t, d] - min_t kH[t, d])^2  <  sum_d (max_t k[t, d] - min_t k[t, d])^2 .

The statistic is four reductions over the tile (a min and a max per channel, in both frames: the rotated tile is
computed anyway) plus two length-D sums; no second normalization pass. The result is a 1-bit flag per record;
decode scores a flagged (unrotated) tile with q instead of q·H. V keeps its rotation.

Optional refinement (`choose_k_rotation(..., channel_weights=sink_query_weights(...))`): weight each channel's
range by the mean squared query of the sink's (prefill) queries, i.e. compare predicted score errors instead of
key errors. It needs D floats of per-sequence state per (layer, KV head), set once at prefill.

Candidates compared at the same bits on the data and protocol of `kvarn_eval.quality` (its capture, tiles,
decode-faithful attention error and KL are reused): see `CANDIDATE_TITLES`. Every K path goes through the real
record round trip (`reference.quantize_tile_records` / `dequantize_tiles`, 16-bit scales): the unrotated path
feeds the tile pre-rotated by H, so the record's own rotation cancels (H·H = I). Records are made with
`rotate_k=True` (format v1's always-rotated K), so that each candidate's K path is isolated; format v2 ships the
rule itself (`reference.choose_k_rotation`, the sign of K col_scale[0]).

Run ``python -m benchmarks.experiments.rotation_choice --out reports/rotation_choice``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvarn_eval import quality as Q
from kvarn_eval.codecs import TileCodec
from kvarn_kernels import KVarNFormat, reference

REPORT_VERSION = 1
DEFAULT_MARGIN = 1.0
PRIMARY = "k4v2_g128"
CONFIGS = ("k4v2_g128", "k4v4_g128", "k2v2_g128")
RULE = "rule"
CANDIDATE_TITLES = {
    "kivi": "KIVI-style RTN (K per channel, V per token, no rotation), float32 scales",
    "kvarn": "KVarN now: K and V rotated, normalized, RTN, 16-bit scales",
    "k-plain": "K never rotated (normalization + RTN on the raw tile), V as KVarN",
    RULE: "per-tile flag, recommended: rotate K iff sum_d range(kH)_d^2 < sum_d range(k)_d^2 (choose_k_rotation)",
    "rule-qw": "per-tile flag, query-weighted: the rule with channel weights = mean squared sink query per channel "
    "(sink_query_weights; D floats per (sequence, layer, KV head), set at prefill)",
    "rule-m0.8": "per-tile flag: rotate K iff range cost rotated < 0.8 × unrotated",
    "rule-m1.25": "per-tile flag: rotate K iff range cost rotated < 1.25 × unrotated",
    "flag-imb4": "per-tile flag: rotate K iff max/median of the tile's channel std < 4",
    "flag-kerr": "per-tile flag, second pass: quantize both ways, keep the lower actual K error (2× the work)",
    "static-sink": "per (layer, KV head), once: the range rule on the 16-bit sink tile (first 128 tokens)",
    "static-sink-q": "per (layer, KV head), once: lower score error of the sink queries on the quantized sink tile",
    "eq-tile-std": "per-tile channel equalization: k/std_d, then KVarN, then × std_d (D extra 16-bit scales)",
    "oracle-q": "UPPER BOUND, not implementable: per tile, lower score error on the layer's future queries",
}
METHODS_BY_CONFIG = {
    "k4v2_g128": tuple(CANDIDATE_TITLES),
    "k4v4_g128": ("kivi", "kvarn", "k-plain", RULE, "rule-qw", "flag-kerr", "static-sink", "oracle-q"),
    "k2v2_g128": ("kivi", "kvarn", "k-plain", RULE, "rule-qw", "flag-kerr", "static-sink", "oracle-q"),
}
FLAGGED = tuple(n for n in CANDIDATE_TITLES if n not in ("kivi", "kvarn", "eq-tile-std"))  # K path by a flag


# --- the decision function (ported: reference.k_range_cost / choose_k_rotation, format v2) ---------------------------
k_range_cost = reference.k_range_cost


def choose_k_rotation(
    k_tiles: torch.Tensor,
    margin: float = DEFAULT_MARGIN,
    k_rot: torch.Tensor | None = None,
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whether to Hadamard-rotate each K tile: k_tiles [..., G, D] (original frame, e.g. [N, H, G, D]) → bool [...].

    True (rotate, the current KVarN path) iff k_range_cost(k · H) < margin · k_range_cost(k): the rotation is
    kept only when it lowers the predicted per-channel RTN error of the tile. Loud, bounded channels (RoPE'd key
    biases: sinusoids over the positions, offsets) are cheapest in their own channel, and rotating them floods the
    quiet channels; heavy-tailed or spread-out energy is cheaper after rotation. A constant or all-zero tile
    (equal costs) is not rotated. `k_rot` (= k_tiles · H) may be passed when already computed.

    `channel_weights` [..., D] (optional, broadcast against the tile's leading dims, e.g. [H, D]): the expected
    squared query per channel, e.g. `sink_query_weights`. The score error of per-channel RTN is then
    sum_d w_d range_d^2 unrotated, and mean_d(w) · sum_d range(kH)_d^2 rotated (rotated errors land evenly on
    all channels); rotate iff the latter is below margin × the former. None means uniform weights (the rule).
    """
    rotated, unrotated = reference.k_frame_costs(k_tiles, k_rot, channel_weights)
    return rotated < margin * unrotated


sink_query_weights = reference.sink_query_weights


# --- K paths through the record round trip -------------------------------------------------------------------------
def _fmt(config: str, head_dim: int) -> KVarNFormat:
    return KVarNFormat.from_preset(f"kvarn_{config}", head_dim, torch.float16)


def record_paths(k: torch.Tensor, v: torch.Tensor, config: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K rotated path, K unrotated path, V) reconstructions of tiles [N, H, G, D], through 16-bit records."""
    fmt = _fmt(config, k.shape[-1])
    k_rot, v_hat = reference.dequantize_tiles(reference.quantize_tile_records(k, v, fmt, rotate_k=True), fmt)
    # Feeding k·H makes the record rotate it back to k: the codes then hold the unrotated tile.
    plain_records = reference.quantize_tile_records(reference.rotate(k), v, fmt, rotate_k=True)
    k_plain_h, _ = reference.dequantize_tiles(plain_records, fmt)
    return k_rot, reference.rotate(k_plain_h), v_hat


def _select(flags: torch.Tensor, k_rot: torch.Tensor, k_plain: torch.Tensor) -> torch.Tensor:
    return torch.where(flags[..., None, None], k_rot, k_plain)


def _score_err(qg: torch.Tensor, dk: torch.Tensor) -> torch.Tensor:
    """Sum of squared score errors of queries qg [H, M, D] on key errors dk [N, H, G, D] → [N, H]."""
    return torch.einsum("hmd,nhgd->nhmg", qg, dk).square().sum((-1, -2))


class FlagLog:
    """Per label, the rotate flags [N, H] and rotated/unrotated range-cost ratios of every codec call."""

    def __init__(self) -> None:
        self.flags: dict[str, list[torch.Tensor]] = {}
        self.ratios: list[torch.Tensor] = []

    def add(self, label: str, flags: torch.Tensor) -> None:
        self.flags.setdefault(label, []).append(flags.detach().flatten().bool())

    def unrotated_fraction(self, label: str) -> float | None:
        if label not in self.flags:
            return None
        f = torch.cat(self.flags[label])
        return float((~f).float().mean())


def layer_codecs(
    q: torch.Tensor, k: torch.Tensor, methods: Sequence[Q.Method], log: FlagLog, log_ratios: bool = False
) -> dict[str, TileCodec]:
    """Codecs for one layer: q [Hq, L, D], k [H, L, D] (the layer's sink and queries are what static and oracle
    candidates may use). Both K record paths are computed once per configuration and shared."""
    h, d = k.shape[0], k.shape[-1]
    rep = q.shape[0] // h
    sink_k = k[:, : Q.SINK][None].float()  # [1, H, SINK, D]: the 16-bit sink, one tile
    sink_q = q[:, : Q.SINK].reshape(h, rep * Q.SINK, d).float()  # query head h*rep + r uses KV head h
    sink_w = sink_query_weights(q[:, : Q.SINK], h)  # [H, D]
    future_q = q[:, Q.SINK :: 4].reshape(h, -1, d).float()  # oracle only: queries it must not see
    memo: dict[str, tuple[torch.Tensor, ...]] = {}
    static: dict[str, torch.Tensor] = {}

    def paths(kt: torch.Tensor, vt: torch.Tensor, config: str) -> tuple[torch.Tensor, ...]:
        if config not in memo:
            memo[config] = record_paths(kt, vt, config)
            if log_ratios:
                log.ratios.append((k_range_cost(reference.rotate(kt)) / k_range_cost(kt).clamp_min(1e-30)).flatten())
        return memo[config]

    def static_flags(config: str) -> tuple[torch.Tensor, torch.Tensor]:
        if config not in static:
            kr, kp, _ = record_paths(sink_k, sink_k, config)
            static[config] = _score_err(sink_q, kr - sink_k)[0] <= _score_err(sink_q, kp - sink_k)[0]
        return choose_k_rotation(sink_k)[0], static[config]

    def codec_for(m: Q.Method) -> TileCodec:
        name, config = m.name, m.config
        if name == "kivi":
            return Q.make_codec("kivi", config)

        def codec(kt: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kt, vt = kt.float(), vt.float()
            if name == "eq-tile-std":
                fmt = _fmt(config, d)
                sig = kt.std(-2, keepdim=True).clamp_min(1e-3).half().float()  # stored as D 16-bit scales
                records = reference.quantize_tile_records(kt / sig, vt, fmt, rotate_k=True)
                k_hat, v_hat = reference.dequantize_tiles(records, fmt)
                return k_hat * sig, v_hat
            k_rot, k_plain, v_hat = paths(kt, vt, config)
            nh = kt.shape[:2]
            if name == "kvarn":
                return k_rot, v_hat
            if name == "k-plain":
                flags = torch.zeros(nh, dtype=torch.bool)
            elif name == RULE:
                flags = choose_k_rotation(kt)
            elif name == "rule-qw":
                flags = choose_k_rotation(kt, channel_weights=sink_w)
            elif name.startswith("rule-m"):
                flags = choose_k_rotation(kt, float(name[len("rule-m") :]))
            elif name == "flag-imb4":
                s = kt.std(-2)
                flags = s.amax(-1) / s.median(-1).values < 4.0
            elif name == "flag-kerr":
                flags = (k_rot - kt).square().sum((-1, -2)) <= (k_plain - kt).square().sum((-1, -2))
            elif name == "static-sink":
                flags = static_flags(config)[0][None].expand(nh)
            elif name == "static-sink-q":
                flags = static_flags(config)[1][None].expand(nh)
            elif name == "oracle-q":
                flags = _score_err(future_q, k_rot - kt) <= _score_err(future_q, k_plain - kt)
            else:
                raise ValueError(f"candidate {name!r} is unknown")
            log.add(m.label, flags)
            return _select(flags, k_rot, k_plain), v_hat

        return codec

    return {m.label: codec_for(m) for m in methods}


def all_methods(configs: Sequence[str]) -> list[Q.Method]:
    return [Q.Method(n, c) for c in configs for n in METHODS_BY_CONFIG[c]]


# --- running ---------------------------------------------------------------------------------------------------
def evaluate_dataset(
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]],
    methods: Sequence[Q.Method],
    queries: int,
    progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """Evaluate every layer (q, k, v, scaling); summary, per-layer metrics, flag rates and range-cost ratios."""
    from tqdm.auto import tqdm

    length = layers[0][1].shape[1]
    pos = Q.query_positions(length, queries)
    per_layer, logs = [], []
    for q, k, v, scaling in tqdm(layers, desc=desc, disable=not progress):
        log = FlagLog()
        codecs = layer_codecs(q, k, methods, log, log_ratios=True)
        per_layer.append(Q.evaluate_layer(q, k, v, methods, pos, scaling, codecs))
        logs.append(log)
    summary, by_layer = Q.aggregate(per_layer)
    labels = [m.label for m in methods if m.name in FLAGGED]
    flag_rate = {}
    for lab in labels:
        allf = torch.cat([torch.cat(lg.flags[lab]) for lg in logs])
        flag_rate[lab] = {
            "unrotated_fraction": float((~allf).float().mean()),
            "per_layer": [lg.unrotated_fraction(lab) for lg in logs],
        }
    ratios = [torch.cat(lg.ratios) for lg in logs]
    allr = torch.cat(ratios)
    qs = torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    ratio_stats = {
        "quantiles": dict(zip([f"q{int(x * 100)}" for x in qs], torch.quantile(allr, qs).tolist(), strict=True)),
        "per_layer_min": [float(r.min()) for r in ratios],
        "per_layer_median": [float(r.median()) for r in ratios],
        "fraction_within_10pct_of_1": float(((allr > 0.9) & (allr < 1.1)).float().mean()),
    }
    return {"results": summary, "per_layer": by_layer, "flags": flag_rate, "range_cost_ratio": ratio_stats,
            "queries_per_head": int(pos.numel())}  # fmt: skip


def load_layers(name: str, tokens: int, cache: Path | None) -> tuple[list[tuple], dict[str, Any]]:
    """Captured (q, k, v, scaling) per layer of model `name` (via quality.capture_model), optionally cached."""
    path = cache / f"{name}-{tokens}.pt" if cache else None
    if path is not None and path.exists():
        d = torch.load(path)
        return d["layers"], d["meta"]
    layers, meta = Q.capture_model(name, tokens)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"layers": layers, "meta": meta}, path)
    return layers, meta


def compute_cost(head_dim: int, group: int) -> dict[str, Any]:
    """Work of the rule per (tile, KV head), against the normalization it precedes (elementwise passes over the tile).

    One normalization iteration builds the balanced tile three times and takes four std reductions (two passes
    each): about 11 passes, 8 iterations, plus about 6 for the guard and the RTN.
    """
    norm_passes = 11 * reference.NORMALIZE_ITERS + 6
    return {
        "rule_elementwise_ops": 4 * head_dim * group + 4 * head_dim,
        "rule_description": "a min and a max per channel over the G tokens of the raw and of the rotated tile "
        "(4·D·G compares), then D subtracts and squares per frame, two sums of D and one compare",
        "rule_passes_over_tile": 4,
        "normalization_passes_over_tile_approx": norm_passes,
        "rule_relative_to_normalization": round(4 / norm_passes, 3),
    }


# --- report ----------------------------------------------------------------------------------------------------
def _f(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.4f}" if abs(x) >= 0.01 else f"{x:.2e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _headline_row(name: str, res: dict[str, dict[str, float]], unrotated: float | None) -> str:
    a, b, c, d = (res[f"{m}:{PRIMARY}"] for m in ("kivi", "kvarn", RULE, "rule-qw"))
    cells = [_f(x["attn_kl"]) for x in (a, b, c, d)]
    cells += [_f(x[mt]) for mt in ("attn_rel_err", "k_rel_err") for x in (a, b, c)]
    return f"| {name} | " + " | ".join(cells) + f" | {_pct(unrotated)} |"


def render_markdown(report: dict[str, Any]) -> str:
    ds_all = report["datasets"]
    lines = [
        "# Choosing per K tile whether to Hadamard-rotate: a calibration-free fix for key-bias models",
        "",
        f"Generated by `{report['command']}` ({report['runtime_s']['total']:.0f} s on "
        f"{report['setup']['threads']} CPU thread(s)). Protocol, data, tokens and metrics are those of "
        "`kvarn_eval.quality` (reports/quality): sink 128 tokens 16-bit, tiles of 128 after it, decode-faithful "
        "causal attention of 256 sampled queries per head (the models' own post-RoPE queries; Gaussian queries on "
        f"synthetic data), {report['setup']['tokens']} tokens of pg-essays per model. K/V errors are relative "
        "Frobenius over the quantized tokens; attention error is relative to the exact attention output; KL is "
        "KL(P_exact || P_quant) in nats; all means over (layer, head). Every KVarN variant uses 16-bit record "
        "scales; KIVI keeps float32 scales.",
        "",
        "## Recommended rule",
        "",
        "Per (tile, KV head), with k the tile [G, D] in the original frame and kH its rotation:",
        "",
        "    rotate K  <=>  sum_d (max_t kH[t,d] - min_t kH[t,d])^2  <  sum_d (max_t k[t,d] - min_t k[t,d])^2",
        "",
        "(`choose_k_rotation`). V is always rotated. The flag costs one bit per record; decode scores an "
        "unrotated tile with q instead of q·H (both are at hand). Flag rate below = fraction of (tile, KV head) "
        "records whose K is left **unrotated**. Optional refinement `rule-qw`: weight channel d's squared range by "
        "w_d = mean squared sink query (post-RoPE, prefill) of channel d, and the rotated cost by mean_d w_d "
        "(predicted score error instead of key error); it needs D floats per (sequence, layer, KV head).",
        "",
        "## Headline, k4v2_g128",
        "",
        "| data | KIVI KL | KVarN now KL | KVarN + rule KL | + rule-qw KL | KIVI attn err | KVarN now attn err "
        "| KVarN + rule attn err | KIVI K err | KVarN now K err | KVarN + rule K err | unrotated |",
        "|---|" + "---|" * 11,
    ]
    for name, ds in ds_all.items():
        cd = ds["configs"][PRIMARY]
        lines.append(_headline_row(name, cd["results"], cd["flags"][f"{RULE}:{PRIMARY}"]["unrotated_fraction"]))
        if "layer0" in cd:
            fr0 = cd["flags"][f"{RULE}:{PRIMARY}"]["per_layer"][0]
            lines.append(_headline_row(f"{name}, layer 0", cd["layer0"], fr0))
    lines += ["", "## Findings", ""] + report["findings"] + [""]
    lines += ["## Candidates", ""] + [f"- `{k}`: {v}" for k, v in CANDIDATE_TITLES.items()]
    metrics = ("k_rel_err", "v_rel_err", "attn_rel_err", "attn_kl")
    for name, ds in ds_all.items():
        lines += ["", f"## {name}", "", ds["setup_line"], ""]
        for config, cd in ds["configs"].items():
            has_l0 = "layer0" in cd
            head = "| candidate | " + " | ".join(Q.METRIC_TITLES[m] for m in metrics)
            head += " | layer 0 attn err | layer 0 KL" if has_l0 else ""
            head += " | unrotated |"
            lines += [f"### {config}", "", head, "|---|" + "---|" * (len(metrics) + 1 + 2 * has_l0)]
            for lab, vals in cd["results"].items():
                cells = [_f(vals[m]) for m in metrics]
                if has_l0:
                    cells += [_f(cd["layer0"][lab]["attn_rel_err"]), _f(cd["layer0"][lab]["attn_kl"])]
                fr = cd["flags"].get(lab, {}).get("unrotated_fraction")
                nm = lab.split(":")[0]
                lines.append(f"| {'**' + nm + '**' if nm == RULE else nm} | " + " | ".join(cells) + f" | {_pct(fr)} |")
            lines.append("")
        rc = ds["configs"][PRIMARY]["range_cost_ratio"]
        qtxt = ", ".join(f"{k} {v:.2f}" for k, v in rc["quantiles"].items())
        near = _pct(rc["fraction_within_10pct_of_1"])
        lines += [f"Range-cost ratio rotated / unrotated over all (tile, KV head): {qtxt}; {near} of tiles within "
                  "±10 % of the threshold 1.", ""]  # fmt: skip
        if "per_layer" in ds["configs"][PRIMARY] and len(rc["per_layer_min"]) > 1:
            cd = ds["configs"][PRIMARY]
            pl = cd["per_layer"]
            fl = cd["flags"][f"{RULE}:{PRIMARY}"]["per_layer"]
            lines += [f"Per layer, {PRIMARY} (KL: KIVI / KVarN now / KVarN + rule; min and median range-cost ratio):",
                      "", "| layer | KIVI KL | KVarN KL | rule KL | KIVI attn | KVarN attn | rule attn | unrotated "
                      "| ratio min | ratio median |", "|---|" + "---|" * 9]  # fmt: skip
            for i in range(len(fl)):
                row = [_f(pl[f"{m}:{PRIMARY}"]["attn_kl"][i]) for m in ("kivi", "kvarn", RULE)]
                row += [_f(pl[f"{m}:{PRIMARY}"]["attn_rel_err"][i]) for m in ("kivi", "kvarn", RULE)]
                row += [_pct(fl[i]), f"{rc['per_layer_min'][i]:.2f}", f"{rc['per_layer_median'][i]:.2f}"]
                lines.append(f"| {i} | " + " | ".join(row) + " |")
            lines.append("")
    c = report["compute_cost"]
    lines += ["## Cost", "",
              f"- Compute, per (tile, KV head): {c['rule_description']}. For D = 64, G = 128 that is "
              f"{c['rule_elementwise_ops']} elementwise ops, about {c['rule_relative_to_normalization']:.0%} of the "
              "8-iteration normalization's elementwise passes; no second normalization pass (the second-pass "
              "variant `flag-kerr` doubles quantization work and is no better).",
              "- Storage: 1 bit per (tile, KV head) record. It fits in the record at zero bytes: K's col_scale "
              "(the per-token scale exp(log_s_tok)) is strictly positive, so its sign bit is free "
              "(e.g. store −col_scale[0] for an unrotated tile; format version bump).",
              "- Decode: q·H is already computed once per step; an unrotated tile is scored with the plain q. "
              "The attention output needs no change (V is always rotated).", "",
              f"Setup: `{json.dumps(report['setup'])}`", ""]  # fmt: skip
    return "\n".join(lines)


def findings(datasets: dict[str, Any]) -> list[str]:
    out = []
    for name, ds in datasets.items():
        cd = ds["configs"][PRIMARY]
        r = cd["results"]
        g = {m: r[f"{m}:{PRIMARY}"] for m in ("kivi", "kvarn", RULE, "rule-qw", "k-plain", "flag-kerr", "oracle-q")}
        fr = cd["flags"][f"{RULE}:{PRIMARY}"]["unrotated_fraction"]
        out.append(
            f"- **{name}** ({PRIMARY}): KL KIVI {_f(g['kivi']['attn_kl'])}, KVarN now {_f(g['kvarn']['attn_kl'])}, "
            f"+ rule {_f(g[RULE]['attn_kl'])} (now / rule = {g['kvarn']['attn_kl'] / g[RULE]['attn_kl']:.2f}×, "
            f"KIVI / rule = {g['kivi']['attn_kl'] / g[RULE]['attn_kl']:.2f}×); attention-output error "
            f"{_f(g['kivi']['attn_rel_err'])} / {_f(g['kvarn']['attn_rel_err'])} / {_f(g[RULE]['attn_rel_err'])}; "
            f"K unrotated in {_pct(fr)} of tiles. Never rotating K: KL {_f(g['k-plain']['attn_kl'])}; second pass "
            f"(flag-kerr): {_f(g['flag-kerr']['attn_kl'])}; sink-query-weighted rule (rule-qw): "
            f"{_f(g['rule-qw']['attn_kl'])}; future-query oracle: {_f(g['oracle-q']['attn_kl'])}."
        )
        for config, other in ds["configs"].items():
            if config == PRIMARY:
                continue
            ro = other["results"]
            kl = {m: ro[f"{m}:{config}"]["attn_kl"] for m in ("kivi", "kvarn", RULE, "rule-qw")}
            att = {m: ro[f"{m}:{config}"]["attn_rel_err"] for m in ("kivi", "kvarn", RULE, "rule-qw")}
            out.append(
                f"  - {config}: KL KIVI / now / rule / rule-qw = "
                + " / ".join(_f(x) for x in kl.values())
                + "; attention-output error "
                + " / ".join(_f(x) for x in att.values())
                + "."
            )
        if "per_layer" in cd:
            pl = cd["per_layer"]
            now, rule = pl[f"kvarn:{PRIMARY}"]["attn_kl"], pl[f"{RULE}:{PRIMARY}"]["attn_kl"]
            worse = [i for i, (a, b) in enumerate(zip(now, rule, strict=True)) if b > 1.1 * a]
            better = [i for i, (a, b) in enumerate(zip(now, rule, strict=True)) if b < a / 1.1]
            out.append(
                f"  - layers where the rule's KL is >10 % below KVarN now: {len(better)}/{len(now)}; >10 % above: "
                f"{len(worse)}/{len(now)}" + (f" (layers {', '.join(map(str, worse))})." if worse else ".")
            )
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.rotation_choice",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/rotation_choice")
    ap.add_argument("--models", nargs="*", default=["qwen2.5-coder-0.5b", "smollm2-135m"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--synthetic", nargs="*", default=list(Q.SYNTHETIC), choices=list(Q.SYNTHETIC))
    ap.add_argument("--synthetic-tokens", type=int, default=2048)
    ap.add_argument("--capture-cache", default=None, help="folder to keep captured q/k/v in between runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    cache = Path(args.capture_cache) if args.capture_cache else None
    t0 = time.perf_counter()
    runtime: dict[str, float] = {}
    sources: list[tuple[str, Callable[[], tuple[list[tuple], str]]]] = []
    for kind in args.synthetic:

        def syn(kind: str = kind) -> tuple[list[tuple], str]:
            q, k, v = Q.synthetic_data(kind, args.synthetic_tokens, 8, 16, 128, 0)
            return [(q, k, v, None)], f"{args.synthetic_tokens} tokens, 8 KV / 16 query heads, head_dim 128, seed 0."

        sources.append((kind, syn))
    for name in [m for m in args.models if m != "none"]:

        def mod(name: str = name) -> tuple[list[tuple], str]:
            layers, meta = load_layers(name, args.tokens, cache)
            return layers, (f"{name} on {meta['tokens']} tokens of `{meta['text']}`: {meta['num_layers']} layers, "
                            f"{meta['num_kv_heads']} KV / {meta['num_q_heads']} query heads, "
                            f"head_dim {meta['head_dim']}.")  # fmt: skip

        sources.append((f"model-{name}", mod))
    datasets: dict[str, Any] = {}
    for name, load in sources:
        t1 = time.perf_counter()
        layers, setup_line = load()
        ds: dict[str, Any] = {"setup_line": setup_line, "configs": {}}
        for config in args.configs:
            res = evaluate_dataset(layers, all_methods([config]), args.queries, progress, f"{name} {config}")
            if name.startswith("model-"):
                res["layer0"] = {lab: {mt: v[0] for mt, v in pl.items()} for lab, pl in res["per_layer"].items()}
            else:
                res.pop("per_layer")
            ds["configs"][config] = res
        datasets[name] = ds
        runtime[name] = round(time.perf_counter() - t1, 1)
        del layers
    runtime["total"] = round(time.perf_counter() - t0, 1)
    import transformers

    setup = {"sink_tokens": Q.SINK, "tokens": args.tokens, "synthetic_tokens": args.synthetic_tokens,
             "queries": args.queries, "margin": DEFAULT_MARGIN, "kvarn_scale_dtype": "float16",
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "transformers": transformers.__version__, "python": platform.python_version()}  # fmt: skip
    report = {
        "report": "kvarn-rotation-choice", "version": REPORT_VERSION,
        "command": f"python -m benchmarks.experiments.rotation_choice {shlex.join(argv)}".strip(),
        "setup": setup, "candidates": CANDIDATE_TITLES, "runtime_s": runtime,
        "compute_cost": compute_cost(64, 128), "findings": findings(datasets), "datasets": datasets,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rotation_choice.json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    (out / "rotation_choice.md").write_text(render_markdown(report))
    print(f"wrote {out / 'rotation_choice.md'} and .json in {runtime['total']:.0f} s")
    for line in report["findings"]:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
