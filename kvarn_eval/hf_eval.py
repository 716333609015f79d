"""Accuracy of KVarNCache on a real model: perplexity fed through the cache, greedy agreement, and baselines.

Perplexity is measured the way a long generation sees its cache: the text goes through the model in chunks of
`chunk` tokens (chunk=1 is token by token), each chunk attending to the cache filled by the chunks before it, so
every token after the first two tiles attends to quantized history. Compared on the same text and chunking:
- "16-bit": transformers' DynamicCache (the reference);
- KVarN presets through the real `KVarNCache` (fused "kvarn" attention, kernel-core reference on CPU);
- "kivi-kXvY": a KIVI-style baseline, simulated: the same tiles, sink and tail as KVarN, but plain min-max
  round-to-nearest, per channel for K and per token for V, without rotation or normalization.
`SimulatedTileCache` also re-implements KVarN tile by tile from the kernel core's quantizer (`codecs.kvarn_codec`:
quantize then dequantize each tile as it fills); the tests use it as the oracle for KVarNCache.

Run `python -m kvarn_eval.hf_eval --name smollm2_wiki` to write reports/hf/smollm2_wiki.{json,md}; `--ablations`
switches KVarN's parts (sink, normalization, rotation, scale dtype, group) one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvarn_kernels import PRESETS

from .codecs import TileCodec, kivi_codec, kvarn_codec, kvarn_variant_codec

KIVI_BASELINES = {"kivi-k4v2": (4, 2), "kivi-k4v4": (4, 4), "kivi-k2v2": (2, 2)}
REPORT_PRESETS = ("kvarn_k4v2_g128", "kvarn_k4v4_g128", "kvarn_k2v2_g128", "kvarn_k4v2_g64")


class SimulatedTileLayer(DynamicLayer):
    """Dense 16-bit storage where each full tile after the sink is replaced by `codec`'s image when it fills.

    Same policy as KVarNCache (the first `sink` tokens, G by default, and the newest partial tile in 16-bit, each
    tile quantized once) and the same view per forward (stored history, then the new tokens in 16-bit). No left
    padding.
    """

    def __init__(self, codec: TileCodec, group: int, sink: int | None = None) -> None:
        super().__init__()
        self.codec = codec
        self.group = group
        self.sink = group if sink is None else sink

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        g, sink = self.group, self.sink
        done = max(self.get_seq_length() - sink, 0) // g
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        full = max(keys.shape[-2] - sink, 0) // g
        self.keys, self.values = keys.clone(), values.clone()
        if full > done:
            span = slice(sink + g * done, sink + g * full)
            b, h, _, d = keys.shape
            tiles_k = keys[:, :, span].reshape(b, h, full - done, g, d).transpose(1, 2).reshape(-1, h, g, d)
            tiles_v = values[:, :, span].reshape(b, h, full - done, g, d).transpose(1, 2).reshape(-1, h, g, d)
            k_hat, v_hat = self.codec(tiles_k, tiles_v)

            def back(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(b, full - done, h, g, d).transpose(1, 2).reshape(b, h, -1, d)

            self.keys[:, :, span] = back(k_hat)
            self.values[:, :, span] = back(v_hat)
        return keys, values


class SimulatedTileCache(Cache):
    """A cache of `SimulatedTileLayer`s; with a config, sliding-window layers keep a 16-bit window as in KVarNCache."""

    def __init__(self, codec: TileCodec, group: int, config: Any | None = None, sink: int | None = None) -> None:
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: SimulatedTileLayer(codec, group, sink))
            return
        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        super().__init__(layers=[
            DynamicSlidingWindowLayer(text.sliding_window) if kind == "sliding_attention" else
            SimulatedTileLayer(codec, group, sink) for kind in types
        ])


# KVarN k4v2 with one part changed at a time: (codec, group, sink). "kvarn_k4v2_g128" itself is the real cache.
ABLATIONS: dict[str, Callable[[], tuple[TileCodec, int, int]]] = {
    "sink 0": lambda: (kvarn_codec("kvarn_k4v2_g128"), 128, 0),
    "sink 256": lambda: (kvarn_codec("kvarn_k4v2_g128"), 128, 256),
    "no normalization (iters 0)": lambda: (kvarn_variant_codec(4, 2, iters=0), 128, 128),
    "iters 2": lambda: (kvarn_variant_codec(4, 2, iters=2), 128, 128),
    "iters 16": lambda: (kvarn_variant_codec(4, 2, iters=16), 128, 128),
    "no rotation": lambda: (kvarn_variant_codec(4, 2, rotate=False), 128, 128),
    "scales float16": lambda: (kvarn_variant_codec(4, 2, scale_dtype=torch.float16), 128, 128),
    "scales float32": lambda: (kvarn_variant_codec(4, 2, scale_dtype=torch.float32), 128, 128),
    "g64, sink 64 (= kvarn_k4v2_g64)": lambda: (kvarn_codec("kvarn_k4v2_g64"), 64, 64),
    "g64, sink 128": lambda: (kvarn_codec("kvarn_k4v2_g64"), 64, 128),
}


SINK_QUERIES = "+sink-queries"


def make_cache(method: str, config: Any) -> Cache:
    """A fresh cache for `method`: "16-bit", a KVarN preset (with "+sink-queries": KVarNCache(k_frame=
    "sink-queries")), "sim:<preset>", a KIVI baseline or an ABLATIONS key."""
    from kvarn_hf import KVarNCache

    if method == "16-bit":
        return DynamicCache()
    if method in PRESETS:
        return KVarNCache(preset=method, config=config)
    if method.endswith(SINK_QUERIES) and method.removesuffix(SINK_QUERIES) in PRESETS:
        return KVarNCache(preset=method.removesuffix(SINK_QUERIES), config=config, k_frame="sink-queries")
    if method in KIVI_BASELINES:
        return SimulatedTileCache(kivi_codec(*KIVI_BASELINES[method]), 128, config)
    if method.startswith("sim:") and method[4:] in PRESETS:
        return SimulatedTileCache(kvarn_codec(method[4:]), PRESETS[method[4:]][2], config)
    if method in ABLATIONS:
        codec, group, sink = ABLATIONS[method]()
        return SimulatedTileCache(codec, group, config, sink)
    raise ValueError(f"method {method!r} is unknown: use 16-bit, a preset ({', '.join(PRESETS)}) [+sink-queries], "
                     "sim:<preset>, "
                     f"{', '.join(KIVI_BASELINES)} or one of {', '.join(ABLATIONS)}")


# --- measurements ------------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_scores(model: Any, ids: torch.Tensor, cache: Cache, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood float64 [T-1], argmax prediction [T-1]) of ids[0, 1:] with the text fed through
    `cache` `chunk` tokens per forward, each chunk attending to the cache of the chunks before it."""
    nll, top1 = [], []
    for start in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, start : min(start + chunk, ids.shape[1] - 1)]
        logits = model(piece, past_key_values=cache, use_cache=True).logits[0].double()
        target = ids[0, start + 1 : start + 1 + piece.shape[1]]
        nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        top1.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(top1)


@torch.no_grad()
def greedy(model: Any, prompts: torch.Tensor, method: str, new_tokens: int) -> torch.Tensor:
    """Greedy continuations [P, new_tokens] of each prompt row, one generate() call per prompt."""
    outs = []
    for prompt in prompts:
        prompt = prompt[None]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False,
                             past_key_values=make_cache(method, model.config))
        outs.append(out[0, prompt.shape[1] :])
    return torch.stack(outs)


def agreement(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Greedy agreement of continuations [P, N]: mean identical prefix and fraction of equal positions."""
    same = got == want
    return {"identical_prefix": float(same.long().cumprod(1).sum(1).float().mean()),
            "match_fraction": float(same.float().mean())}


def evaluate(
    model_name: str = "smollm2-135m",
    text_name: str = "wiki",
    num_tokens: int = 2048,
    chunk: int = 64,
    methods: tuple[str, ...] = ("16-bit", *REPORT_PRESETS, *KIVI_BASELINES),
    greedy_prompts: int = 4,
    greedy_prompt_tokens: int = 384,
    greedy_new: int = 32,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Perplexity and teacher-forced top-1 agreement of every method on the first `num_tokens` tokens of a text,
    and greedy agreement on `greedy_prompts` prompts taken from the text after those tokens."""
    import kvarn_hf  # noqa: F401  (registers attn_implementation="kvarn")
    from kvarn_eval.assets import fetch_text, load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=dtype, device=device, attn_implementation="kvarn")
    load_s = time.perf_counter() - t0
    all_ids = tokenizer(fetch_text(text_name), return_tensors="pt").input_ids.to(device)
    need = num_tokens + greedy_prompts * greedy_prompt_tokens
    if all_ids.shape[1] < need:
        raise ValueError(f"text {text_name!r} has only {all_ids.shape[1]} tokens, fewer than {need}")
    ids = all_ids[:, :num_tokens]
    prompts = all_ids[0, num_tokens:need].view(greedy_prompts, greedy_prompt_tokens)
    results: dict[str, Any] = {}
    reference_top1 = reference_greedy = None
    for method in ("16-bit", *(m for m in methods if m != "16-bit")):
        t0 = time.perf_counter()
        nll, top1 = chunked_scores(model, ids, make_cache(method, model.config), chunk)
        seconds = time.perf_counter() - t0
        continuation = greedy(model, prompts, method, greedy_new) if greedy_prompts else None
        if method == "16-bit":
            reference_top1, reference_greedy = top1, continuation
        results[method] = {
            "ppl": math.exp(float(nll.mean())),
            "nll_sum": float(nll.sum()),
            "top1_agreement": float((top1 == reference_top1).float().mean()),
            "greedy": agreement(continuation, reference_greedy) if greedy_prompts else None,
            "seconds": seconds,
        }
    base = results["16-bit"]["ppl"]
    for r in results.values():
        r["ppl_delta_pct"] = 100 * (r["ppl"] / base - 1)
    return {
        "model": model_name, "text": text_name, "tokens": num_tokens, "chunk": chunk, "dtype": str(dtype),
        "device": device, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "load_seconds": load_s,
        "greedy_setup": {"prompts": greedy_prompts, "prompt_tokens": greedy_prompt_tokens, "new_tokens": greedy_new},
        "results": results,
    }


def to_markdown(report: dict[str, Any], command: str) -> str:
    g = report["greedy_setup"]
    lines = [
        f"# KVarNCache accuracy on {report['model']}",
        "",
        f"Text `{report['text']}`, first {report['tokens']} tokens, fed through the cache {report['chunk']} "
        f"token(s) per forward; {report['dtype']} on {report['device']} ({report['machine']}); torch "
        f"{report['torch']}, transformers {report['transformers']}. Top-1: teacher-forced next-token argmax equal "
        f"to the 16-bit cache's. Greedy: {g['prompts']} prompts of {g['prompt_tokens']} tokens (later in the same "
        f"text), {g['new_tokens']} new tokens each; identical prefix averaged over prompts. Produced by `{command}`.",
        "",
        "| cache | perplexity | Δ vs 16-bit | top-1 agreement | greedy identical prefix | greedy equal tokens |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in report["results"].items():
        gr = r["greedy"]
        prefix = f"{gr['identical_prefix']:.1f}/{g['new_tokens']}" if gr else "—"
        match = f"{100 * gr['match_fraction']:.0f} %" if gr else "—"
        lines.append(f"| {method} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f} % | {100 * r['top1_agreement']:.1f} % "
                     f"| {prefix} | {match} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="wiki")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["16-bit", *REPORT_PRESETS, *KIVI_BASELINES])
    parser.add_argument("--ablations", action="store_true", help="run the KVarN k4v2 ablations instead")
    parser.add_argument("--greedy-prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("reports/hf"))
    parser.add_argument("--name", required=True, help="report file stem under --out")
    args = parser.parse_args(argv)
    methods = ("16-bit", "kvarn_k4v2_g128", *ABLATIONS) if args.ablations else tuple(args.methods)
    report = evaluate(args.model, args.text, args.tokens, args.chunk, methods, args.greedy_prompts)
    command = "python -m kvarn_eval.hf_eval " + " ".join(argv if argv is not None else sys.argv[1:])
    report["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(report, command))
    print(to_markdown(report, command))


if __name__ == "__main__":
    main()
