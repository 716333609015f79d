"""Quick GPU smoke test: a tiny dummy-weight Llama (head_dim 128) through vLLM with the 16-bit cache and KVarN,
eager and with CUDA graphs; prints greedy-token agreement. One engine per process.

    python benchmarks/vllm/smoke.py
"""

import json
import subprocess
import sys
from pathlib import Path

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2048,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 4,
          "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
CHILD = """
import json, os, sys
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
kv, eager = sys.argv[1], sys.argv[2] == "1"
kw = dict(model="/tmp/smoke-llama", load_format="dummy", skip_tokenizer_init=True, gpu_memory_utilization=0.3,
          max_model_len=4096, enforce_eager=eager, seed=0)
if kv != "auto":
    kw["kv_cache_dtype"] = kv
llm = LLM(**kw)
lens = [5, 300, 700, 1100]
ps = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 31000 + 1 for j in range(n)]) for i, n in enumerate(lens)]
outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
cc = llm.llm_engine.vllm_config.cache_config
res = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "blocks": cc.num_gpu_blocks, "block_size": cc.block_size}
print("RESULT" + json.dumps(res))
"""


def run(kv: str, eager: bool) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, kv, "1" if eager else "0"], capture_output=True, text=True,
                       timeout=300)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if not lines:
        return {"error": (p.stdout + p.stderr)[-5000:]}
    return json.loads(lines[-1][6:])


Path("/tmp/smoke-llama").mkdir(exist_ok=True)
Path("/tmp/smoke-llama/config.json").write_text(json.dumps(CONFIG))
base = run("auto", True)
print("auto", {k: v for k, v in base.items() if k != "tokens"})
for kv, eager in (("kvarn_k4v2_g128", True), ("kvarn_k4v2_g128", False)):
    r = run(kv, eager)
    if "error" in r:
        print(kv, "eager" if eager else "graphs", "ERROR", r["error"])
        continue
    same = [a == b for a, b in zip(base.get("tokens", []), r["tokens"], strict=False)]
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
             for a, b in zip(base.get("tokens", []), r["tokens"], strict=False)]
    print(kv, "eager" if eager else "graphs", "blocks", r["blocks"], "block_size", r["block_size"],
          "identical", same, "first divergence", first)
