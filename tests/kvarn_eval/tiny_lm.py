"""A tiny random Llama with a byte-level BPE tokenizer trained here, saved as a Hugging Face folder (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Answer: 3 + 4 = 7. So the answer is 7.",
    "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n",
    "The following are multiple choice questions (with answers) about anatomy.\nA. one\nB. two\nC. three\nD. four\n",
] * 4


def save_tiny_model(folder: Path, vocab: int = 384, seed: int = 0) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=vocab - 2, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
