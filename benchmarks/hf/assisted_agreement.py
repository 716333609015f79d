"""Assisted decoding with KVarNCache against plain greedy decoding with the same cache preset, on a real model.

    python benchmarks/hf/assisted_agreement.py                       # SmolLM2-135M on CPU, prompt 300, 100 new tokens
    python benchmarks/hf/assisted_agreement.py --device cuda --new-tokens 500 --out benchmarks/hf/results/assisted/h100

The prompt is the first `--prompt-tokens` tokens of the Wikipedia text of `kvarn_eval.assets`. The assistant is the
model itself over a 16-bit DynamicCache, drafting exactly `--drafts` tokens per round (constant schedule, no
confidence cut-off): most of each draft is accepted, so the main model's verification forwards are long and span tile
boundaries, and the drafts it rejects (where KVarN and 16-bit greedy part) are cropped. transformers caps every
draft at the tokens still to generate, so drafts longer than `--new-tokens - 1` run as that.

For each draft length it reports the greedy tokens that are identical to plain decoding's (from the start, and in
all), the largest difference of the main model's logits over the identical prefix (float rounding, amplified where a
key computed in a batch of tokens rounds one quantization code the other way), the number of verification forwards
and the longest one. It also runs the prompt and then all drafts in one verification forward, against one-token
decoding of the same tokens, with and without `verify_from` (the largest logit difference before and after the first
tile that completes inside that forward: after it, keys computed in a batch may round a code the other way).
Writes assisted_agreement_<attn>_<dtype>.json (with the command) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a kvarn_eval.assets model name")
    parser.add_argument("--preset", default="kvarn_k4v2_g64", help="KVarN preset of the main model's cache")
    parser.add_argument("--attn", default="kvarn", choices=["kvarn", "sdpa", "eager"],
                        help="attn_implementation of the model (kvarn: fused attention from the packed tiles)")
    parser.add_argument("--prompt-tokens", type=int, default=300, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument("--drafts", type=int, nargs="+", default=[20, 200, 400], help="draft lengths to try")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="benchmarks/hf/results/assisted/cpu", help="folder of the JSON result")
    args = parser.parse_args()

    import kvarn_hf
    from kvarn_eval.assets import fetch_text, load_model

    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device, attn_implementation=args.attn)
    ids = tokenizer(fetch_text("wiki"), return_tensors="pt").input_ids[:, : args.prompt_tokens].to(args.device)
    forwards: list[int] = []

    def count_forwards(module, call_args, kwargs):  # the main model's forwards over its KVarNCache
        if isinstance(kwargs.get("past_key_values"), kvarn_hf.KVarNCache):
            forwards.append((kwargs["input_ids"] if "input_ids" in kwargs else call_args[0]).shape[1])

    model.register_forward_pre_hook(count_forwards, with_kwargs=True)

    def run(assistant_tokens: int | None) -> tuple[dict, float]:
        forwards.clear()
        extra = {}
        if assistant_tokens is not None:
            model.generation_config.update(num_assistant_tokens=assistant_tokens,
                                           num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
            extra["assistant_model"] = model
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, past_key_values=kvarn_hf.KVarNCache(args.preset),
                                 **extra)
        return {"tokens": out.sequences[0, ids.shape[1]:].tolist(), "logits": [x[0].float().cpu() for x in out.logits],
                "forwards": list(forwards)}, time.perf_counter() - start

    def one_forward_check() -> dict:
        """The prompt, then all drafts (the prompt's next new_tokens - 1 tokens) in one verification forward, against
        one-token decoding of the same tokens: with verify_from (what assisted generate() does) and without (each
        token of the forward sees its tiles in 16-bit). Split at the first tile completed inside the forward."""
        text = tokenizer(fetch_text("wiki"), return_tensors="pt").input_ids[:, : ids.shape[1] + args.new_tokens - 1]
        text = text.to(args.device)
        prompt = ids.shape[1]

        def logits(verify_from: int | None, one_by_one: bool) -> torch.Tensor:
            cache = kvarn_hf.KVarNCache(args.preset)
            cache.bind(model.config, None, verify_from=verify_from)
            with torch.no_grad():
                model(text[:, :prompt], past_key_values=cache)
                if not one_by_one:
                    return model(text[:, prompt:], past_key_values=cache).logits[0].float()
                return torch.cat([model(text[:, p : p + 1], past_key_values=cache).logits[0].float()
                                  for p in range(prompt, text.shape[1])])

        group = kvarn_hf.KVarNCache(args.preset)._paging.group
        first_end = max(2 * group - 1, -(-(prompt + 1) // group) * group - 1)  # first tile ending at or past prompt
        split = first_end - prompt + 1  # queries from here on see a tile completed inside the forward
        want = logits(None, True)
        out = {"tokens_in_forward": text.shape[1] - prompt, "first_tile_completed_at": first_end}
        for name, verify_from in (("verify_from", prompt), ("one_step", None)):
            diff = (logits(verify_from, False) - want).abs().amax(-1).cpu()
            out[name] = {"max_logit_diff_before_first_tile": float(diff[:split].max()),
                         "max_logit_diff_after": float(diff[split:].max()) if split < diff.numel() else None}
        return out

    runs = [None, *args.drafts]
    results = {}
    for drafts in tqdm(runs, desc="generations", unit="run"):
        results[drafts], seconds = run(drafts)
        results[drafts]["seconds"] = round(seconds, 1)
    plain = results[None]
    rows = []
    for drafts in args.drafts:
        got = results[drafts]
        n = min(len(got["tokens"]), len(plain["tokens"]))
        equal = [a == b for a, b in zip(got["tokens"][:n], plain["tokens"][:n], strict=True)]
        prefix = next((i for i, same in enumerate(equal) if not same), n)
        diffs = [float((a - b).abs().max()) for a, b in zip(got["logits"][:prefix], plain["logits"][:prefix],
                                                              strict=True)]
        verify = got["forwards"][1:]  # the first forward holds the prompt
        margin = None
        if prefix < n:  # plain decoding's top-2 logit gap where the runs part: a near tie or not
            top = plain["logits"][prefix].topk(2).values
            margin = float(top[0] - top[1])
        rows.append({
            "num_assistant_tokens": drafts, "identical_prefix": prefix, "tokens_compared": n,
            "match_fraction": sum(equal) / n, "max_logit_diff_over_prefix": max(diffs, default=0.0),
            "logit_diff_per_token": [float(f"{d:.3g}") for d in diffs],
            "top2_margin_at_first_difference": margin, "verification_forwards": len(got["forwards"]),
            "longest_forward_after_prompt": max(verify, default=0), "first_forward": got["forwards"][0],
            "seconds": got["seconds"],
        })
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "setup": {k: v for k, v in vars(args).items() if k != "out"},
        "group": kvarn_hf.KVarNCache(args.preset)._paging.group,
        "plain_seconds": plain["seconds"], "plain_forwards": len(plain["forwards"]), "rows": rows,
        "one_forward_check": one_forward_check(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"assisted_agreement_{args.attn}_{args.dtype}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model} {args.preset} attn={args.attn} {args.dtype} on {args.device}: prompt {ids.shape[1]} tokens, "
          f"{args.new_tokens} new; plain greedy {plain['seconds']} s")
    print("| drafts | identical prefix | match | max logit diff (prefix) | top-2 gap at 1st diff | forwards "
          "| longest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "-" if r["top2_margin_at_first_difference"] is None else f"{r['top2_margin_at_first_difference']:.2e}"
        print(f"| {r['num_assistant_tokens']} | {r['identical_prefix']} / {r['tokens_compared']} | "
              f"{r['match_fraction']:.3f} | {r['max_logit_diff_over_prefix']:.2e} | {gap} | "
              f"{r['verification_forwards']} | {r['longest_forward_after_prompt']} |")
    check = result["one_forward_check"]
    print(f"one verification forward of {check['tokens_in_forward']} tokens after the prompt vs one-token decoding, "
          f"max logit difference before / after the tile completed at position {check['first_tile_completed_at']}: "
          + "; ".join(f"{name} {check[name]['max_logit_diff_before_first_tile']:.2e} / "
                      f"{check[name]['max_logit_diff_after'] or 0:.2e}" for name in ("verify_from", "one_step")))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
