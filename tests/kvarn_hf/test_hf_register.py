"""Registration with transformers, the supported version range, and the models and settings that are refused."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from hf_models import PRESET, make_model, tokens
from packaging.version import Version
from transformers import (
    AttentionInterface,
    Gemma2Config,
    GenerationMixin,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    masking_utils,
)
from transformers.generation import configuration_utils
from transformers.masking_utils import AttentionMaskInterface

import kvarn_hf
from kvarn_hf import KVarNCache


def test_import_registers_kvarn_with_transformers():
    assert AttentionInterface._global_mapping["kvarn"] is kvarn_hf.kvarn_attention
    assert AttentionMaskInterface._global_mapping["kvarn"] is kvarn_hf.kvarn_mask
    assert "kvarn" in configuration_utils.ALL_CACHE_IMPLEMENTATIONS
    kvarn_hf.register()  # idempotent
    assert configuration_utils.ALL_CACHE_IMPLEMENTATIONS.count("kvarn") == 1


# The private transformers functions that kvarn_hf wraps (register.py; docs/transformers.md says why).
PRIVATE_HOOKS = [(GenerationMixin, "_prepare_cache_for_generation"), (masking_utils, "_preprocess_mask_arguments"),
                 (GenerationMixin, "_valid_auto_compile_criteria"), (PreTrainedModel, "get_compiled_call")]


@pytest.mark.parametrize("owner, name", PRIVATE_HOOKS)
def test_each_private_hook_is_wrapped_once(owner, name):
    hook = getattr(owner, name)
    assert hook._kvarn and not getattr(hook.__wrapped__, "_kvarn", False)
    kvarn_hf.register()
    assert getattr(owner, name) is hook


@pytest.mark.parametrize("owner, name", PRIVATE_HOOKS)
def test_a_changed_or_missing_private_function_is_refused_naming_the_version(owner, name, monkeypatch):
    version = re.escape(transformers.__version__)

    def changed(renamed, *args):
        raise AssertionError("kvarn_hf must not call a function whose parameters it does not know")

    monkeypatch.setattr(owner, name, changed)
    with pytest.raises(RuntimeError, match=rf"{name} of transformers {version} takes \['renamed', 'args'\], not"):
        kvarn_hf.register()
    assert getattr(owner, name) is changed
    monkeypatch.delattr(owner, name)
    with pytest.raises(RuntimeError, match=rf"transformers {version} has no .*{name}, which kvarn_hf hooks"):
        kvarn_hf.register()


def test_installed_transformers_is_in_the_tested_range():
    low, high = kvarn_hf.SUPPORTED_TRANSFORMERS
    assert low <= Version(transformers.__version__) < high


def test_from_pretrained_accepts_attn_implementation_kvarn(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="kvarn")
    assert model.config._attn_implementation == "kvarn"
    cache = KVarNCache(PRESET)
    model.generate(tokens(20), attention_mask=torch.ones(1, 20, dtype=torch.long), max_new_tokens=3,
                   past_key_values=cache)
    assert cache.fused


def refused(config, match, attn="sdpa"):
    config._attn_implementation = attn
    with pytest.raises(ValueError, match=match):
        KVarNCache(PRESET, config=config)


def test_models_that_cannot_be_served_are_refused_up_front():
    refused(LlamaConfig(hidden_size=160, num_attention_heads=2, head_dim=80), "head_dim 80 is not supported")
    refused(MistralConfig(sliding_window=4096), "every layer of this model uses sliding-window attention")
    refused(Gemma2Config(), "soft-capping", attn="kvarn")
    refused(LlamaConfig(layer_types=["full_attention", "linear_attention"], num_hidden_layers=2), "linear_attention")


def test_generate_refuses_right_padding_and_bad_configs():
    model = make_model("llama")
    ids = tokens(10, batch=2)
    with pytest.raises(ValueError, match="left padding only"):
        model.generate(ids, attention_mask=torch.tensor([[1] * 10, [1] * 8 + [0] * 2]), max_new_tokens=2,
                       past_key_values=KVarNCache(PRESET))
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, max_new_tokens=2, past_key_values=KVarNCache(PRESET), cache_implementation="kvarn")


def test_a_cache_filled_without_config_cannot_later_serve_sliding_layers():
    model = make_model("gemma3")
    cache = KVarNCache(PRESET)
    k = torch.zeros(1, 1, 5, 256)  # filled without any model (a model's forward would give it the layer types)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    with pytest.raises(ValueError, match="sliding-window layers were quantized"):
        cache.bind(model.config)


def test_fused_layers_refuse_a_custom_4d_mask():
    model = make_model("llama", "kvarn")
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="custom attention mask"):
        model(tokens(5), attention_mask=mask, past_key_values=KVarNCache(PRESET, config=model.config))
