"""Tiny random-weight models of every architecture KVarNCache supports (imported by the kvarn_hf tests)."""

from __future__ import annotations

import torch
import transformers

import kvarn_hf  # noqa: F401  (registers attn_implementation="kvarn")

# 2 layers, tiny widths; head_dim 64, 96 (Phi-3-mini's), 128 and 256 all appear. Gemma-3 mixes a sliding and a full
# layer.
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=128)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=128, sliding_window=None)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=2)),  # head_dim 96
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"])),
}
PRESET = "kvarn_k4v2_g64"
GROUP = 64


def make_model(arch: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    config_cls, model_cls, kwargs = ARCHS[arch]
    config = config_cls(vocab_size=128, intermediate_size=128, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, **kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()


def tokens(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random ids avoiding the pad/bos/eos ids 0-2."""
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


CHUNKS_16BIT = (60, 1, 1, 40, 1, 1)  # 104 positions < 2G: nothing is quantized yet
CHUNKS_QUANT = (150, 1, 1, 30, 1, 70, 1, 1)  # 255 positions: 2 tiles quantized, several steps later


def run(model, cache, chunks, seed=0, device="cpu"):
    """Logits of every forward of a chunked run through `cache` (float32)."""
    ids = tokens(sum(chunks), batch=2, seed=seed).to(device)
    out, pos = [], 0
    for n in chunks:
        out.append(model(ids[:, pos : pos + n], past_key_values=cache).logits.float())
        pos += n
    return out


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
