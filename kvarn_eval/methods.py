"""The KV-cache methods an evaluation compares, by name: how to build each cache and what it stores per token.

Names (``kvarn eval --methods``):

- ``16-bit``: transformers' DynamicCache, the reference;
- a KVarN preset (``kvarn_k4v2_g128``, ...): the real ``KVarNCache`` (fused "kvarn" attention);
- ``sim:<preset>``: the same KVarN tiles through ``SimulatedTileCache`` (quantize-dequantize each tile as it fills,
  dense attention): the tests hold ``KVarNCache`` to this oracle, and on a CPU it runs several times faster;
- KVarN ablations at a preset's bits: ``<preset>-norot`` (no Hadamard rotation), ``<preset>-nonorm`` (no variance
  normalization: plain per-row RTN after rotation);
- ``kivi-k4v2``, ``kivi-k4v4``, ``kivi-k2v2``: KIVI-style min-max RTN at the same bits (K per channel, V per token,
  16-bit scale and zero, same tiles, sink and 16-bit tail as KVarN);
- ``quanto-4bit``, ``quanto-2bit``: transformers' ``QuantizedCache`` with the optimum-quanto backend (its defaults:
  groups of 64, a 16-bit window of the newest 128 tokens), needs ``pip install optimum-quanto``;
- ``hf-fp8``: transformers' ``QuantizedCache(backend="fp8")`` (float8 e4m3, one scale per tensor).

``kv_bytes_per_token`` is the storage of one token's K and V for one KV head in one layer, with 16-bit activations,
counting codes and per-group scales and ignoring the 16-bit sink/tail windows (which do not grow with the context).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvarn_kernels import PRESETS, KVarNFormat

__all__ = ["METHOD_GROUPS", "Method", "available", "get_method", "method_names", "resolve_methods"]


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "16-bit", "kvarn", "kvarn-sim", "ablation", "kivi", "quanto", "fp8"
    description: str
    bytes_per_token: Callable[[int], float]  # head_dim -> bytes of K+V per token per KV head per layer
    make: Callable[[Any], Any]  # model config -> a fresh cache
    needs: str | None = None  # an optional package this method imports


def _preset_bytes(preset: str) -> Callable[[int], float]:
    import torch

    return lambda d: KVarNFormat.from_preset(preset, d, torch.float16).bytes_per_token_per_head


def _kivi_bytes(kb: int, vb: int, group: int = 128) -> Callable[[int], float]:
    # K: codes + a 16-bit scale and zero per channel per tile; V: codes + a 16-bit scale and zero per token
    return lambda d: d * kb / 8 + d * 4 / group + d * vb / 8 + 4


def _hf_eval() -> Any:
    from kvarn_eval import hf_eval

    return hf_eval


def _build() -> dict[str, Method]:
    methods: dict[str, Method] = {
        "16-bit": Method("16-bit", "16-bit", "transformers DynamicCache (16-bit K and V)", lambda d: 4.0 * d,
                         lambda cfg: _hf_eval().make_cache("16-bit", cfg)),
    }
    for preset, (kb, vb, g) in PRESETS.items():
        methods[preset] = Method(
            preset, "kvarn", f"KVarN K{kb}/V{vb}, tiles of {g} (KVarNCache, fused attention)", _preset_bytes(preset),
            lambda cfg, p=preset: _hf_eval().make_cache(p, cfg))
        methods[f"sim:{preset}"] = Method(
            f"sim:{preset}", "kvarn-sim", f"KVarN K{kb}/V{vb}, tiles of {g}, simulated tiles (same codec)",
            _preset_bytes(preset), lambda cfg, p=preset: _hf_eval().make_cache(f"sim:{p}", cfg))

        def ablation(cfg: Any, kb: int = kb, vb: int = vb, g: int = g, **kw: Any) -> Any:
            hf = _hf_eval()
            return hf.SimulatedTileCache(hf.kvarn_variant_codec(kb, vb, **kw), g, cfg, g)

        methods[f"{preset}-norot"] = Method(
            f"{preset}-norot", "ablation", f"KVarN K{kb}/V{vb} g{g} without the Hadamard rotation",
            _preset_bytes(preset), lambda cfg, a=ablation: a(cfg, rotate=False))
        methods[f"{preset}-nonorm"] = Method(
            f"{preset}-nonorm", "ablation", f"KVarN K{kb}/V{vb} g{g} without variance normalization (rotation + RTN)",
            _preset_bytes(preset), lambda cfg, a=ablation: a(cfg, iters=0))
    for name, (kb, vb) in {"kivi-k4v2": (4, 2), "kivi-k4v4": (4, 4), "kivi-k2v2": (2, 2)}.items():
        methods[name] = Method(name, "kivi", f"KIVI-style min-max RTN K{kb}/V{vb}, tiles of 128, no rotation",
                               _kivi_bytes(kb, vb), lambda cfg, n=name: _hf_eval().make_cache(n, cfg))
    for bits in (4, 2):
        def quanto(cfg: Any, bits: int = bits) -> Any:
            from transformers import QuantizedCache

            return QuantizedCache(backend="quanto", config=cfg, nbits=bits)

        methods[f"quanto-{bits}bit"] = Method(
            f"quanto-{bits}bit", "quanto", f"transformers QuantizedCache, optimum-quanto int{bits}, groups of 64",
            lambda d, bits=bits: 2 * d * (bits / 8 + 4 / 64), quanto, needs="optimum.quanto")

    def fp8(cfg: Any) -> Any:
        from transformers import QuantizedCache

        return QuantizedCache(backend="fp8", config=cfg)

    methods["hf-fp8"] = Method("hf-fp8", "fp8", "transformers QuantizedCache, float8 e4m3, one scale per tensor",
                               lambda d: 2.0 * d, fp8)
    return methods


_METHODS: dict[str, Method] | None = None


def _all() -> dict[str, Method]:
    global _METHODS
    if _METHODS is None:
        _METHODS = _build()
    return _METHODS


def method_names() -> list[str]:
    return list(_all())


def available(method: Method) -> bool:
    """Whether the optional package the method needs is installed."""
    if method.needs is None:
        return True
    try:
        return importlib.util.find_spec(method.needs) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def get_method(name: str) -> Method:
    methods = _all()
    if name not in methods:
        raise ValueError(f"method {name!r} is unknown; allowed: {', '.join(methods)} "
                         f"(groups: {', '.join(METHOD_GROUPS)})")
    return methods[name]


# Shorthands for --methods.
METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "presets": tuple(PRESETS),
    "sim-presets": tuple(f"sim:{p}" for p in PRESETS),
    "ablations": ("kvarn_k4v2_g128-norot", "kvarn_k4v2_g128-nonorm", "kivi-k4v2"),
    "baselines": ("kivi-k4v2", "kivi-k2v2", "quanto-4bit", "quanto-2bit", "hf-fp8"),
    "cpu-default": ("16-bit", "sim:kvarn_k4v2_g128", "sim:kvarn_k4v4_g128", "sim:kvarn_k2v2_g128",
                    "kvarn_k4v2_g128-norot", "kvarn_k4v2_g128-nonorm", "kivi-k4v2", "kivi-k2v2",
                    "quanto-4bit", "quanto-2bit"),
}


def resolve_methods(names: list[str] | tuple[str, ...]) -> list[Method]:
    """Expand groups, check every name, put 16-bit first (every comparison is against it), drop duplicates.

    A method whose optional package is missing raises, naming the package.
    """
    out: list[str] = ["16-bit"]
    for name in names:
        for n in METHOD_GROUPS.get(name, (name,)):
            get_method(n)
            if n not in out:
                out.append(n)
    methods = [get_method(n) for n in out]
    missing = [m for m in methods if not available(m)]
    if missing:
        raise ValueError(f"method(s) {', '.join(m.name for m in missing)} need the package(s) "
                         f"{', '.join(sorted({m.needs or '' for m in missing}))}: pip install optimum-quanto")
    return methods
