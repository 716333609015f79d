"""Convert a GGUF model to a 16-bit Hugging Face folder that vLLM loads (run in its own process).

    python benchmarks/vllm/gguf_to_hf.py GGUF_FILE OUT_DIR [--dtype float16|bfloat16]
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("gguf")
ap.add_argument("out")
ap.add_argument("--dtype", default="bfloat16")
a = ap.parse_args()
path = Path(a.gguf)
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
if getattr(model, "hf_quantizer", None) is not None:
    model.hf_quantizer.remove_quantization_config(model)
model.to(getattr(torch, a.dtype)).save_pretrained(a.out)
tok.save_pretrained(a.out)
print("saved", a.out)
