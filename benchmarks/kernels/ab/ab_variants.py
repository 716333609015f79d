"""A/B timing of attention-kernel variants and launch options on a GPU, with a correctness check per variant.

    PYTHONPATH=/path/to/copy:. python benchmarks/kernels/ab/ab_variants.py TAG '[{"decode": {"num_warps": 4}}]' [what]

A variant is a copy of the `kvarn_kernels` package put first on PYTHONPATH (e.g. `git archive REV kvarn_kernels |
tar -x -C /tmp/v0`), so several revisions run in one device call. Each config sets the launch options
(`decode` at head_dim 128, `decode_groups` at head_dim 128 with row groups, `decode_d64`, `decode_d256`, `chunk`),
`chunk_rows`, `min_tiles_per_split` and `dims` (head dims, default [128]), `dense_block` (16-bit tokens per step,
default 32), `tile_groups` (tiles a decode program attends at once, default 4), `dense_units` (work units a
split counts per G 16-bit tokens; default: the module's), `programs_per_sm` ({head_dim: n}: the split rule's decode
programs per SM), `chunk_ns` (query counts of the timed chunks, default [8, 512]), `attrs` ({name: value}: other
constants of the attention module: `Tuning` field names, or module constants of revisions before `Tuning`),
`dtype` (the model dtype, default "bfloat16").
`what` (default decode,chunk) may add `split` (per-kernel times of batch-1 decode) and `flash` (flash SDPA on 16-bit
KV at the decode shapes, once per dtype). One JSON line per (config, head_dim): max |error| of decode and a chunk
against `reference.paged_attention_ref` and a digest of those outputs' bits (equal across versions: bit-identical),
then microseconds per call (CUDA-graph medians) for a few decode shapes (32 query / 8 KV heads) and a 16K-history
chunk of 8 and 512 queries.
Revisions with `attention.Tuning` get each config as a `tuning=` argument; older revisions (no other handle) get their
module constants set and restored.
Results of one round: benchmarks/kernels/results/ab/h100/2026-11-23_87d5bad.log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import torch

import kvarn_kernels
from benchmarks.kernels.bench_decode import graph_time_ms, make_state
from kvarn_kernels import attention
from kvarn_kernels.attention import decode_attention, paged_attention
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.reference import paged_attention_ref

DECODE_SHAPES = [(1, 1024), (1, 2048), (1, 4096), (1, 16384), (8, 2048), (8, 16384), (64, 16384), (64, 131072),
                 (8, 65536), (1, 131072), (8, 131072), (32, 131072), (64, 65536)]
_TUNING = None  # the current config's launch choices (revisions with `attention.Tuning`)
_TUNING_FIELDS = {"decode": "launch_options", "decode_groups": "launch_options_groups", "decode_d256":
                  "launch_options_d256", "decode_d64": "launch_options_d64", "chunk": "chunk_launch_options",
                  "dense_block": "dense_block", "tile_groups": "max_tile_groups", "dense_units": "dense_units"}


def _kw() -> dict:
    """The `tuning=` argument of the current config (none for revisions before `attention.Tuning`)."""
    return {} if _TUNING is None else {"tuning": _TUNING}


def _set_options(cfg: dict) -> None:
    global _TUNING
    if not hasattr(attention, "Tuning"):
        _set_legacy_options(cfg)
        return
    if "min_tiles_per_split" in cfg:
        raise ValueError("min_tiles_per_split is a constant of revisions before attention.Tuning only")
    base = attention.TUNING
    changes = {field: cfg[key] for key, field in _TUNING_FIELDS.items() if key in cfg}
    if "chunk_rows" in cfg:
        changes["chunk_rows"] = {d: cfg["chunk_rows"] for d in (64, 128, 256)}
    if "programs_per_sm" in cfg:
        changes["decode_programs_per_sm"] = {**base.decode_programs_per_sm,
                                             **{int(d): n for d, n in cfg["programs_per_sm"].items()}}
    changes.update({name.lower(): value for name, value in cfg.get("attrs", {}).items()})
    _TUNING = dataclasses.replace(base, **changes)


# Revisions before `attention.Tuning`: their module's own defaults, restored before each config so that one config's
# overrides do not leak into the next.
_PROGRAMS_PER_SM = dict(getattr(attention, "DECODE_PROGRAMS_PER_SM", {}))
_CHUNK_ROWS = getattr(attention, "CHUNK_ROWS", {})
_CHUNK_ROWS = _CHUNK_ROWS.copy() if isinstance(_CHUNK_ROWS, dict) else _CHUNK_ROWS
_ATTRS: dict = {}  # the attention module's values of the constants the current config's `attrs` set


def _set_legacy_options(cfg: dict) -> None:
    attention.LAUNCH_OPTIONS.clear()
    attention.LAUNCH_OPTIONS.update(cfg.get("decode", {"num_warps": 4, "num_stages": 2}))
    if hasattr(attention, "LAUNCH_OPTIONS_GROUPS"):
        attention.LAUNCH_OPTIONS_GROUPS.clear()
        attention.LAUNCH_OPTIONS_GROUPS.update(cfg.get("decode_groups", {"num_warps": 4, "num_stages": 3}))
    attention.LAUNCH_OPTIONS_D256.clear()
    attention.LAUNCH_OPTIONS_D256.update(cfg.get("decode_d256", {"num_warps": 8, "num_stages": 2}))
    if hasattr(attention, "LAUNCH_OPTIONS_D64"):  # older revisions use LAUNCH_OPTIONS at head_dim 64 too
        attention.LAUNCH_OPTIONS_D64.clear()
        attention.LAUNCH_OPTIONS_D64.update(cfg.get("decode_d64", {"num_warps": 4, "num_stages": 2}))
    attention.CHUNK_LAUNCH_OPTIONS.clear()
    attention.CHUNK_LAUNCH_OPTIONS.update(cfg.get("chunk", {"num_warps": 4, "num_stages": 2}))
    if "chunk_rows" not in cfg:
        attention.CHUNK_ROWS = _CHUNK_ROWS.copy() if isinstance(_CHUNK_ROWS, dict) else _CHUNK_ROWS
    elif isinstance(_CHUNK_ROWS, dict):  # by head_dim since 2026-11-24 (34febff)
        attention.CHUNK_ROWS = {d: cfg["chunk_rows"] for d in (64, 128, 256)}
    else:
        attention.CHUNK_ROWS = cfg["chunk_rows"]
    if "min_tiles_per_split" in cfg:
        attention.MIN_TILES_PER_SPLIT = cfg["min_tiles_per_split"]
    attention.DENSE_BLOCK = cfg.get("dense_block", 32)
    if hasattr(attention, "TILE_GROUPS"):
        attention.TILE_GROUPS = cfg.get("tile_groups", 4)
    if "dense_units" in cfg:
        attention.DENSE_UNITS = cfg["dense_units"]
    for name, value in _ATTRS.items():  # the previous config's `attrs`, restored
        setattr(attention, name, value)
    _ATTRS.clear()
    for name, value in cfg.get("attrs", {}).items():
        _ATTRS[name] = getattr(attention, name)
        setattr(attention, name, value)
    attention.DECODE_PROGRAMS_PER_SM.clear()
    attention.DECODE_PROGRAMS_PER_SM.update(_PROGRAMS_PER_SM)
    attention.DECODE_PROGRAMS_PER_SM.update({int(d): n for d, n in cfg.get("programs_per_sm", {}).items()})


def _errors(fmt: KVarNFormat, d: int, dtype: torch.dtype) -> tuple[float, float, str]:
    """(max |error| of a decode and of a chunk against the reference, a digest of both outputs' bits: equal digests
    across code versions mean bit-identical outputs; the inputs come from the seeded generator)."""
    state = make_state(2, 4096 + 77, 8, fmt, dtype)
    q = torch.randn(2, 32, d, device="cuda", dtype=dtype)
    cu = torch.arange(3, device="cuda", dtype=torch.int32)
    out = decode_attention(q, state, **_kw())
    err = (out.float() - paged_attention_ref(q, state, cu).float()).abs().max().item()
    qc = torch.randn(96, 32, d, device="cuda", dtype=dtype)
    kn = torch.randn(96, 8, d, device="cuda", dtype=dtype)
    cuc = torch.tensor([0, 40, 96], device="cuda", dtype=torch.int32)
    got = paged_attention(qc, state, cuc, 56, kn, kn, cuc, **_kw())
    err_chunk = (got.float() - paged_attention_ref(qc, state, cuc, kn, kn, cuc).float()).abs().max().item()
    bits = torch.cat([out.flatten(), got.flatten()]).contiguous().view(torch.int16).cpu().numpy().tobytes()
    return err, err_chunk, hashlib.sha256(bits).hexdigest()[:16]


def _time_decode(fmt: KVarNFormat, d: int, dtype: torch.dtype, batch: int, ctx: int) -> float:
    state = make_state(batch, ctx, 8, fmt, dtype)
    q = torch.randn(batch, 32, d, device="cuda", dtype=dtype)
    return 1e3 * graph_time_ms(lambda: decode_attention(q, state, **_kw()))


def _kernel_split(fmt: KVarNFormat, d: int, dtype: torch.dtype, batch: int, ctx: int) -> dict[str, float]:
    """Microseconds per call of each kernel of one decode call (torch.profiler over 20 calls)."""
    from torch.profiler import ProfilerActivity, profile

    state = make_state(batch, ctx, 8, fmt, dtype)
    q = torch.randn(batch, 32, d, device="cuda", dtype=dtype)
    decode_attention(q, state, **_kw())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            decode_attention(q, state, **_kw())
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = "merge" if "merge" in e.name else "attention" if "attention" in e.name else e.name[:24]
            per[name] = per.get(name, 0.0) + e.device_time_total / 20
    return {k: round(v, 1) for k, v in per.items()}


def _flash_row(tag: str, d: int, dtype: torch.dtype) -> dict:
    """Flash SDPA over 16-bit KV at the decode shapes (the baseline of bench_decode.py), microseconds."""
    row: dict = {"tag": tag, "cfg": "sdpa_flash", "d": d}
    for batch, ctx in DECODE_SHAPES:
        q = torch.randn(batch, 32, 1, d, device="cuda", dtype=dtype)
        k = torch.randn(batch, 8, ctx, d, device="cuda", dtype=dtype)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            ms = graph_time_ms(lambda q=q, k=k: torch.nn.functional.scaled_dot_product_attention(
                q, k, k, enable_gqa=True))
        row[f"b{batch}_{ctx // 1024}K_us"] = round(1e3 * ms, 1)
    return row


def _time_chunk(fmt: KVarNFormat, d: int, dtype: torch.dtype, n: int) -> float:
    state = make_state(1, 16384, 8, fmt, dtype)
    q = torch.randn(n, 32, d, device="cuda", dtype=dtype)
    kn = torch.randn(n, 8, d, device="cuda", dtype=dtype)
    cu = torch.tensor([0, n], device="cuda", dtype=torch.int32)
    return 1e3 * graph_time_ms(lambda: paged_attention(q, state, cu, n, kn, kn, cu, **_kw()))


def main() -> None:
    tag, configs = sys.argv[1], json.loads(sys.argv[2])
    what = sys.argv[3] if len(sys.argv) > 3 else "decode,chunk"
    print("module", kvarn_kernels.__file__, flush=True)
    torch.manual_seed(0)
    if "flash" in what:
        for name in sorted({cfg.get("dtype", "bfloat16") for cfg in configs}):
            print(json.dumps(_flash_row(tag, 128, getattr(torch, name))), flush=True)
    for cfg in configs:
        _set_options(cfg)
        dtype = getattr(torch, cfg.get("dtype", "bfloat16"))
        for d in cfg.get("dims", [128]):
            fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", d, dtype)
            err, err_chunk, digest = _errors(fmt, d, dtype)
            row = {"tag": tag, "cfg": cfg, "d": d, "err_decode": round(err, 4), "err_chunk": round(err_chunk, 4),
                   "outputs_sha256": digest}
            if "decode" in what:
                for batch, ctx in DECODE_SHAPES:
                    if d == 128 or ctx <= 16384:
                        row[f"b{batch}_{ctx // 1024}K_us"] = round(_time_decode(fmt, d, dtype, batch, ctx), 1)
            if "split" in what:
                for batch, ctx in DECODE_SHAPES[:4]:
                    row[f"kernels_b{batch}_{ctx // 1024}K_us"] = _kernel_split(fmt, d, dtype, batch, ctx)
            if "chunk" in what:
                for n in cfg.get("chunk_ns", (8, 512)):
                    row[f"chunk{n}_16K_us"] = round(_time_chunk(fmt, d, dtype, n), 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
