"""Greedy outputs of a real model through vLLM: 16-bit cache vs KVarN presets (eager and CUDA graphs), and through
`vllm serve` + the openai client. One engine per subprocess (vLLM engines do not share a process well).

    python benchmarks/vllm/e2e_greedy.py --model DIR --out benchmarks/vllm/results/e2e_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from failure_log import failure_excerpt  # beside this script

PARAGRAPH = (
    "The history of the lighthouse begins with fires lit on hilltops to guide ships home. Later, towers of stone "
    "carried lamps of oil, and mirrors gathered their light into beams that reached far across the water. Keepers "
    "lived beside them, trimming wicks through the night, writing the weather in their logbooks, and rowing out to "
    "help sailors in distress. When electricity arrived, the lamps grew brighter and the keepers fewer; today most "
    "lights run on their own, watched from offices many miles away. "
)
QUESTIONS = [
    "Summarize the text above in two sentences.",
    "What did lighthouse keepers do at night? Answer briefly.",
    "List three facts from the text.",
    "Write a short poem about the sea.",
    "Explain why lighthouses needed mirrors.",
    "What changed when electricity arrived?",
]


# mode: (enforce_eager, extra LLM kwargs, generate twice). Each is compared with the 16-bit eager run; "graphs" is
# the reference for the others where they should give the same greedy tokens as the plain KVarN run.
MODES = {
    "eager": (True, {}, False),
    "graphs": (False, {}, False),
    "prefix": (True, {"enable_prefix_caching": True}, True),
    "noprefix": (True, {"enable_prefix_caching": False}, False),
    "chunk256": (True, {"max_num_batched_tokens": 256, "enable_chunked_prefill": True}, False),
    "ngram": (True, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
                                            "prompt_lookup_min": 2}}, False),
    # Tensor parallelism (size: --tp): each rank quantizes its own KV heads. vLLM's CPU build needs
    # VLLM_CPU_OMP_THREADS_BIND (e.g. "0|1|0") where there are fewer NUMA nodes than ranks.
    "tp": (True, {"enable_prefix_caching": False, "distributed_executor_backend": "mp"}, False),
    # 24 pages for 6 prompts of ~2600 tokens and their outputs: vLLM must preempt (the count is recorded).
    "preempt": (True, {"num_gpu_blocks_override": 24, "max_num_seqs": 6, "max_model_len": 1536}, False),
}


def prompts(n_repeat: list[int]) -> list[str]:
    out = []
    for i, q in enumerate(QUESTIONS):
        out.append(PARAGRAPH * n_repeat[i % len(n_repeat)] + "\n\n" + q)
    return out


def run_engine(args: argparse.Namespace, kv: str, eager: bool, extra: dict, twice: bool = False) -> dict:
    # ignore_eos: an instruct model without its chat template may stop at once; every prompt gets max_tokens tokens.
    code = f"""
import json, os, time, sys
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
from vllm import LLM, SamplingParams
kw = dict(model={args.model!r}, dtype={args.dtype!r}, gpu_memory_utilization={args.gpu_mem}, max_model_len=8192,
          enforce_eager={eager}, seed=0, disable_log_stats=False)
kw.update({extra!r})
if {kv!r} != "auto":
    kw["kv_cache_dtype"] = {kv!r}
t0 = time.time()
llm = LLM(**kw)
t1 = time.time()
sp = SamplingParams(temperature=0.0, max_tokens={args.max_tokens}, logprobs=5, ignore_eos=True)
outs = llm.generate({prompts(args.repeats)!r}, sp)
if {twice!r}:  # the same prompts again, after the first requests finished: prefix-cache hits
    outs = llm.generate({prompts(args.repeats)!r}, sp)
t2 = time.time()
stats = llm.llm_engine.vllm_config.cache_config
preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
res = dict(preemptions=preemptions, tokens=[list(o.outputs[0].token_ids) for o in outs],
           text=[o.outputs[0].text for o in outs],
           top5=[[[int(t) for t in lp] for lp in o.outputs[0].logprobs] for o in outs],
           prompt_tokens=[len(o.prompt_token_ids) for o in outs], start_s=t1 - t0, gen_s=t2 - t1)
print("RESULT" + json.dumps(res))
"""
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    if p.returncode or not lines:
        return {"error": f"rc={p.returncode}", "log_tail": failure_excerpt(p.stdout + p.stderr),
                "wall_s": time.time() - t}
    res = json.loads(lines[-1][6:])
    res["wall_s"] = time.time() - t
    return res


def run_hf(args: argparse.Namespace, kv: str) -> dict:
    """The same prompts and greedy decoding through the transformers front-end (kvarn_hf, fused attention) with the
    same preset, or transformers' own 16-bit cache for kv == "auto"."""
    code = f"""
import json, time, torch
import kvarn_hf
from kvarn_hf import KVarNCache
from transformers import AutoModelForCausalLM, AutoTokenizer
dev = "cuda" if torch.cuda.is_available() else "cpu"
kv = {kv!r}
tok = AutoTokenizer.from_pretrained({args.model!r})
# vLLM's ignore_eos keeps generating past EOS without suppressing it; min_new_tokens would suppress it.
model = AutoModelForCausalLM.from_pretrained({args.model!r}, dtype=getattr(torch, {args.dtype!r}),
                                             attn_implementation="sdpa" if kv == "auto" else "kvarn").to(dev)
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
t0 = time.time()
tokens = []
for p in {prompts(args.repeats)!r}:
    ids = tok(p, return_tensors="pt").input_ids.to(dev)
    cache = None if kv == "auto" else KVarNCache(kv)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                         max_new_tokens={args.max_tokens})
    tokens.append(out[0, ids.shape[1]:].tolist())
print("RESULT" + json.dumps(dict(tokens=tokens, gen_s=time.time() - t0)))
"""
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    if p.returncode or not lines:
        return {"error": f"rc={p.returncode}", "log_tail": failure_excerpt(p.stdout + p.stderr),
                "wall_s": time.time() - t}
    res = json.loads(lines[-1][6:])
    res["wall_s"] = time.time() - t
    return res


def _vllm_script() -> str:
    """The `vllm` command of the interpreter running this script: beside it in a venv, on PATH, or in the bin/ of a
    PYTHONPATH entry (a `pip install --target` site, as on the GPU machine)."""
    import shutil

    found = [Path(sys.executable).with_name("vllm"), shutil.which("vllm")]
    found += [Path(p) / "bin" / "vllm" for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for f in found:
        if f and Path(f).is_file():
            return str(f)
    raise SystemExit(f"no `vllm` command found (looked at {[str(f) for f in found]})")


def run_server(args: argparse.Namespace, kv: str) -> dict:
    """`vllm serve` as users start it; greedy chat-free completions through the openai client over HTTP."""
    port = 8011
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        launcher = [_vllm_script(), "serve", args.model]
    except importlib.metadata.PackageNotFoundError:
        # vLLM's CPU build is the distribution `vllm-cpu`, and `vllm serve` looks up the version of `vllm`: start
        # the same OpenAI server through its module.
        launcher = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    cmd = launcher + ["--port", str(port), "--dtype", args.dtype, "--max-model-len", "8192",
                      "--gpu-memory-utilization", str(args.gpu_mem), "--kv-cache-dtype", kv, "--enforce-eager"]
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0")
    log = open("/tmp/vllm_serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        import urllib.request

        deadline = time.time() + args.timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except Exception:
                time.sleep(2)
        if proc.poll() is not None:
            return {"error": "server exited", "log_tail": failure_excerpt(Path("/tmp/vllm_serve.log").read_text())}
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        texts = []
        for pr in prompts(args.repeats):
            r = client.completions.create(model=args.model, prompt=pr, max_tokens=args.max_tokens, temperature=0.0,
                                          extra_body={"ignore_eos": True})
            texts.append(r.choices[0].text)
        log_text = Path("/tmp/vllm_serve.log").read_text()
        lines = [ln for ln in log_text.splitlines() if "KV cache size" in ln or "KVarN" in ln]
        return {"text": texts, "log_lines": lines, "launcher": " ".join(launcher[:4])}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def logprobs_close(base: dict, other: dict) -> dict:
    """vLLM's check_logprobs_close rule: up to the first differing token the outputs are equal; there, each run's
    token must be among the other's top-5; nothing after it is compared."""
    ok, where = [], []
    for i, (x, y) in enumerate(zip(base["tokens"], other["tokens"], strict=True)):
        n = next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), None)
        if n is None:
            ok.append(True)
            where.append(None)
            continue
        ok.append(x[n] in other["top5"][i][n] and y[n] in base["top5"][i][n])
        where.append(n)
    return {"close": sum(ok), "of": len(ok), "first_divergence": where}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    first_diff, same = [], 0
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
        first_diff.append(n)
        same += x == y
    return {"identical_outputs": same, "of": len(a), "first_divergence": first_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--presets", default="kvarn_k4v2_g128")
    ap.add_argument("--repeats", default="1,3,6,12", help="paragraph repeats per prompt (~110 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--tp", type=int, default=2, help="tensor_parallel_size of the tp mode (its heads must divide)")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--modes", default="eager,graphs,serve",
                    help=f"any of {', '.join(MODES)}, serve (vllm serve + openai), hf (the transformers front-end)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.repeats = [int(x) for x in args.repeats.split(",")]
    modes = args.modes.split(",")
    results: dict = {"command": " ".join(sys.argv), "model": args.model, "dtype": args.dtype, "runs": {}}
    base = run_engine(args, "auto", True, {})
    results["runs"]["auto/eager"] = base
    print("auto/eager", {k: v for k, v in base.items() if k != "log_tail"} if "error" not in base else base, flush=True)
    for preset in args.presets.split(","):
        for mode in modes:
            if mode == "serve":
                r = run_server(args, preset)
            elif mode == "hf":
                r = run_hf(args, preset)
                hf16 = results["runs"].setdefault("auto/hf", run_hf(args, "auto"))
                if "tokens" in hf16 and "tokens" in base:
                    hf16["vs_16bit"] = agreement(base["tokens"], hf16["tokens"])
                if "tokens" in hf16 and "tokens" in r:
                    r["vs_hf_16bit"] = agreement(hf16["tokens"], r["tokens"])
            else:
                eager, extra, twice = MODES[mode]
                if mode == "tp":
                    extra = {**extra, "tensor_parallel_size": args.tp}
                r = run_engine(args, preset, eager, extra, twice)
            key = f"{preset}/{mode}"
            if "tokens" in r and "tokens" in base:
                r["vs_16bit"] = agreement(base["tokens"], r["tokens"])
                if "top5" in r:
                    r["logprobs_close_to_16bit"] = logprobs_close(base, r)
            if "text" in r and "text" in base:
                r["same_text_as_16bit"] = sum(a == b for a, b in zip(base["text"], r["text"], strict=True))
            ref = results["runs"].get(f"{preset}/noprefix") or results["runs"].get(f"{preset}/eager")
            if mode not in ("eager", "noprefix") and ref and "tokens" in ref and "tokens" in r:
                r["vs_kvarn_eager"] = agreement(ref["tokens"], r["tokens"])
            results["runs"][key] = r
            print(key, json.dumps({k: v for k, v in r.items() if k not in ("tokens", "top5")})[:3000], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
