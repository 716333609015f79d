"""Offline throughput and KV capacity of KV-cache dtypes through vLLM, side by side on one GPU.

Llama-3.1-8B shape with dummy weights (no download), bf16 model, gpu_memory_utilization 0.9, max_model_len 16384,
prefix caching off, prompts as random token ids, ignore_eos: every request generates exactly its output length.
Each configuration runs in its own process; results append to --out (JSON lines keep partial runs).

    python benchmarks/vllm/bench_throughput.py --kv auto,fp8,kvarn_k4v2_g128 --shapes 32x2048+512,96x6144+1024 \
        --out benchmarks/vllm/results/throughput_h100.jsonl
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

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 32,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
}


def model_dir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "config.json").write_text(json.dumps(LLAMA_8B))
    return path


def child(args: argparse.Namespace, kv: str) -> None:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
              gpu_memory_utilization=args.gpu_mem, max_model_len=args.max_model_len, enable_prefix_caching=False,
              seed=0)
    if kv != "auto":
        kw["kv_cache_dtype"] = kv
    if kv.startswith("kvarn") and args.kvarn_max_num_seqs:
        kw["max_num_seqs"] = args.kvarn_max_num_seqs
    t0 = time.time()
    llm = LLM(**kw)
    cc = llm.llm_engine.vllm_config.cache_config
    start_s = time.time() - t0
    rng = np.random.default_rng(0)
    out = {"kv": kv, "start_s": start_s, "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
           "capacity_tokens": cc.num_gpu_blocks * cc.block_size,
           "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs, "shapes": {}}
    for shape in args.shapes.split(","):
        n, rest = shape.split("x")
        p_len, o_len = (int(x) for x in rest.split("+"))
        prompts = [TokensPrompt(prompt_token_ids=rng.integers(1000, 100000, p_len).tolist()) for _ in range(int(n))]
        sp = SamplingParams(temperature=0.0, max_tokens=o_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        t = time.time()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.time() - t
        gen = sum(len(r.outputs[0].token_ids) for r in res)
        out["shapes"][shape] = {"seconds": dt, "generated_tokens": gen, "output_tok_per_s": gen / dt}
        print(kv, shape, f"{dt:.2f} s", flush=True)
    print("RESULT" + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default="auto,fp8,kvarn_k4v2_g128", help="comma-separated kv_cache_dtype values")
    ap.add_argument("--shapes", default="32x2048+512,96x6144+1024", help="NxPROMPT+OUTPUT,...")
    ap.add_argument("--model", default="/tmp/llama8b-shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--kvarn-max-num-seqs", type=int, default=0,
                    help="max_num_seqs for KVarN runs (0: the plugin's default, docs/vllm.md)")
    ap.add_argument("--timeout", type=int, default=560)
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args, args.child)
        return
    model_dir(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for kv in args.kv.split(","):
        cmd = [sys.executable, __file__, "--child", kv] + [a for a in sys.argv[1:]]
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            text = p.stdout + p.stderr
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
            rec = json.loads(lines[-1][6:]) if lines else {"kv": kv, "error": f"rc={p.returncode}",
                                                           "log_tail": failure_excerpt(text)}
        except subprocess.TimeoutExpired as e:
            # A timeout's output is bytes even with text=True.
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rec = {"kv": kv, "error": "timeout", "log_tail": failure_excerpt(out)}
        rec.update(wall_s=time.time() - t, command=" ".join(sys.argv), device=_device())
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "log_tail"}), flush=True)
        if "error" in rec:
            print(rec.get("log_tail", ""), flush=True)


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
