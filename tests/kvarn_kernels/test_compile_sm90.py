"""The attention kernels compile for an H100 (sm_90) on a CPU machine, within its shared memory.

The interpreter runs kernels as Python, so it misses what only the compiler sees. Two such bugs reached a GPU: a
float32 model's kernel did not compile (statements after an early return inside a constexpr branch are still
compiled), and the split merge needed 272 KB of shared memory at head_dim 256 (an H100 has 227 KB per block).
Triton's bundled ptxas compiles without a GPU; the compiles run in a child process without TRITON_INTERPRET
(under the interpreter, @triton.jit functions cannot be compiled).

Bounded work: by default a representative subset of the builds is compiled (every kernel, dtype path and head_dim,
both record groups; a few GQA sizes and split counts of the builds listed per GQA size); KVARN_SM90_ALL=1 compiles
every listed build. Each case has a CPU-time budget (CASE_CPU_LIMIT_S; a case past it fails on its own and the rest
still run), so load from other work slows the test without failing it, and Triton's on-disk cache makes a rerun on
the same machine take seconds.
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from benchmarks.kernels.aot import H100_SHARED_BYTES
from kvarn_kernels.format import DEFAULT_PRESET

FULL = os.environ.get("KVARN_SM90_ALL") == "1"
# Per case: the compile child may spend this many CPU seconds (its own and its finished ptxas runs'; a build takes a few
# to ~30 on one free core), and at most this much wall time as a backstop (a hung ptxas). A CPU budget, not a wall
# clock, so that a machine busy with other work makes the test slower, never wrong.
CASE_CPU_LIMIT_S = 300
CASE_WALL_LIMIT_S = 3600
ROOT = Path(__file__).resolve().parents[2]
ATTENTION_CASES = [("float32", 64, 0, DEFAULT_PRESET),  # float32 models: plain code conversion
                   ("bfloat16", 64, 0, DEFAULT_PRESET),  # head_dim-64 decode (capped registers)
                   ("bfloat16", 128, 0, DEFAULT_PRESET),  # the decode launch the benchmarks time
                   ("bfloat16", 128, 0, "kvarn_k4v4_g64"),  # 64-token tiles (16-token planes)
                   ("bfloat16", 256, 0, DEFAULT_PRESET),  # decode at the largest head_dim (its own launch options)
                   ("bfloat16", 96, 0, DEFAULT_PRESET),  # head_dim 96: 128 wide, padded channels masked
                   ("float16", 256, 64, DEFAULT_PRESET)]  # chunk program at the largest head_dim
MERGE_CASES = [64, 96, 128, 256]
DENSE_HISTORY_CASES = [("bfloat16", 64), ("bfloat16", 96), ("bfloat16", 128), ("float16", 256), ("float32", 128)]


def _attention_shared(dot, head_dim, chunk_rows, preset):
    from benchmarks.kernels import aot

    # Two splits: the split-partial epilogue (one split stores the output instead; compiled in a case below).
    return aot.attention_kernel(dot, head_dim, chunk_rows=chunk_rows, preset=preset, num_splits=2).metadata.shared


def _merge_shared(head_dim):
    from benchmarks.kernels import aot

    return aot.merge_kernel(head_dim).metadata.shared


def _merge_unrotate_usage(head_dim):
    from benchmarks.kernels import aot

    # The merge that un-rotates (`attention.merge_unrotates`: head_dim <= 128), at the split counts where its warps
    # change (merge_meta) and at the most splits: {splits: [shared bytes, local bytes per thread]}.
    out = {}
    for splits in (2, 48, 49, 64):
        kernel = aot.merge_kernel(head_dim, splits, unrotate=True)
        usage = aot.resources(kernel)
        out[splits] = [kernel.metadata.shared, usage["LOCAL"] + usage["STACK"]]
    return out


def _attention_one_split_shared():
    from benchmarks.kernels import aot

    return aot.attention_kernel("bfloat16", 128, num_splits=1).metadata.shared


def _attention_one_tile_shared():
    from benchmarks.kernels import aot

    # Decode one tile at a time (short splits; the cases above compile its row groups, as long contexts run it).
    return aot.attention_kernel("bfloat16", 128, num_splits=2, tile_groups=1).metadata.shared


def _quantize_weighted_shared():
    import torch

    from benchmarks.kernels import aot

    return aot.quantize_kernel(torch.bfloat16, 128, weights=True)[0].metadata.shared


def _quantize_96_shared():
    import torch

    from benchmarks.kernels import aot

    return aot.quantize_kernel(torch.float16, 96, weights=True)[0].metadata.shared  # head_dim 96: 128 wide, masked


def _quantize_loops():
    import torch

    from benchmarks.kernels import aot

    # The two normalization loops (K's and V's programs): [instructions, spill loads/stores inside].
    kernel = aot.quantize_kernel(torch.bfloat16, 128)[0]
    return [[n, ops["LDL"] + ops["STL"]] for n, ops in aot.sass_loops(aot.cuobjdump(kernel, "-sass")) if n > 500]


# Head_dim-128 decode in row groups (long contexts), one split and several.
SPILL_SPLITS = (1, 2, 4, 32) if FULL else (1, 2, 32)


def _decode_loop_spills(splits):
    from benchmarks.kernels import aot

    # Spill loads/stores in the tile loop.
    sass = aot.cuobjdump(aot.attention_kernel("bfloat16", 128, num_splits=splits, tile_groups=4), "-sass")
    _, ops = max(aot.sass_loops(sass), key=lambda loop: loop[0])
    return ops["LDL"] + ops["STL"]


def _one_tile_builds() -> list[tuple[int, str, int]]:
    """The (head_dim, dtype name, GQA size) of the one-tile split builds `Tuning.decode_programs_per_sm_one_tile`
    counts several of per SM; without KVARN_SM90_ALL, those of GQA 4 and 8 (every head_dim, dtype and cap)."""
    from kvarn_kernels import attention

    return [(head_dim, str(dtype).removeprefix("torch."), n_rep)
            for head_dim, dtype, n_rep in attention.TUNING.decode_programs_per_sm_one_tile if FULL or n_rep in (4, 8)]


def _one_tile_residency(head_dim, dot, n_rep):
    import torch

    from benchmarks.kernels import aot
    from kvarn_kernels import attention

    # [registers per thread, threads, shared bytes, programs per SM it assumes, local (spill) bytes per thread, tile
    # loop reloads, tile loop stores] per split count, with the launch options the real launch uses (register caps:
    # `Tuning.one_tile_maxnreg`). 3 splits: a constexpr divisor that is not a power of two (the capped builds are
    # compiled with 2 as well).
    key = (head_dim, getattr(torch, dot), n_rep)
    per_sm = attention.TUNING.decode_programs_per_sm_one_tile[key]
    out = {}
    for splits in (2, 3) if key in attention.TUNING.one_tile_maxnreg else (3,):
        kernel = aot.attention_kernel(dot, head_dim, n_rep=n_rep, num_splits=splits, tile_groups=1)
        usage = aot.resources(kernel)
        _, loop = max(aot.sass_loops(aot.cuobjdump(kernel, "-sass")), key=lambda body: body[0])
        out[f"{dot}-d{head_dim}-gqa{n_rep}-s{splits}"] = [usage["REG"], 32 * kernel.metadata.num_warps,
                                                         kernel.metadata.shared, per_sm,
                                                         usage["LOCAL"] + usage["STACK"], loop["LDL"], loop["STL"]]
    return out


def _merge_waits_before_loading():
    import re

    from benchmarks.kernels import aot

    # [index of the grid-dependency wait (ACQBULK), index of the first global load] in the merge build's SASS.
    out = {}
    for splits, unrotate in ((2, False), (48, False), (64, False), (48, True)):
        sass = aot.cuobjdump(aot.merge_kernel(128, splits, unrotate=unrotate), "-sass")
        ops = [m.group(1).split()[0] for m in (re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(.*?);", line)
                                              for line in sass.splitlines()) if m]
        out[f"{splits}{'-unrotate' if unrotate else ''}"] = [ops.index("ACQBULK") if "ACQBULK" in ops else -1,
                       min(i for i, op in enumerate(ops) if op.startswith("LDG"))]
    return out


def _dense_history_shared(dtype, head_dim):
    import torch

    from benchmarks.kernels import aot

    return aot.dense_history_kernel(getattr(torch, dtype), head_dim).metadata.shared


def _cases() -> dict[str, tuple]:
    """Every case of this run: name -> (function, arguments); each compiles one build or a few small ones."""
    cases = {f"attention-{c}": (_attention_shared, c) for c in ATTENTION_CASES}
    cases.update({f"merge-{d}": (_merge_shared, (d,)) for d in MERGE_CASES})
    cases.update({f"merge-unrotate-{d}": (_merge_unrotate_usage, (d,)) for d in (64, 128)})
    cases.update({f"dense-{c}": (_dense_history_shared, c) for c in DENSE_HISTORY_CASES})
    cases.update({"attention-one-split": (_attention_one_split_shared, ()),
                  "attention-one-tile": (_attention_one_tile_shared, ()),
                  "quantize-weighted": (_quantize_weighted_shared, ()),
                  "quantize-96": (_quantize_96_shared, ()),
                  "quantize-loops": (_quantize_loops, ()),
                  "merge-pdl-order": (_merge_waits_before_loading, ())})
    cases.update({f"decode-loop-spills-{n}": (_decode_loop_spills, (n,)) for n in SPILL_SPLITS})
    cases.update({f"one-tile-residency-{b}": (_one_tile_residency, b) for b in _one_tile_builds()})
    return cases


def _run_cases(names: list[str]) -> None:
    """In the child: one JSON line per case, flushed as it ends (its result, or its compile error)."""
    cases = _cases()
    for name in names:
        fn, args = cases[name]
        try:
            result = fn(*args)
        except Exception as e:  # reported by the test, with the case that failed
            result = f"{type(e).__name__}: {e}"[-2000:]
        print(json.dumps({"case": name, "result": result}), flush=True)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds used by process pid and its finished children (Linux /proc), or None where that is unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def _compile_in_children(names: list[str], cpu_limit_s: float, wall_limit_s: float) -> dict:
    """Run the cases in a child process, each within cpu_limit_s CPU seconds (wall_limit_s where CPU time is unknown,
    and as a backstop): a case past it is killed (with its child) and reported as a TimeoutError, and a new child goes
    on with the cases after it. Each result comes with its case's wall and CPU seconds (`_timings`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # benchmarks.kernels.aot
    results: dict = {}
    pending = list(names)
    while pending:
        with tempfile.TemporaryFile("w+") as err:
            child = subprocess.Popen([sys.executable, __file__, *pending], env=env, stdout=subprocess.PIPE,
                                     stderr=err, text=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
            case_start, case_cpu = time.monotonic(), _cpu_seconds(child.pid) or 0.0
            while pending:
                try:
                    line = lines.get(timeout=5)
                except queue.Empty:
                    cpu = _cpu_seconds(child.pid)
                    wall = time.monotonic() - case_start
                    if (cpu is not None and cpu - case_cpu > cpu_limit_s) or wall > (
                            wall_limit_s if cpu is not None else cpu_limit_s):
                        child.kill()
                        results[pending.pop(0)] = (f"TimeoutError: no result after {wall:.0f} s ("
                                                   f"{'?' if cpu is None else round(cpu - case_cpu)} CPU s)")
                        break
                    continue
                if line is None:  # the child ended early
                    child.wait()
                    err.seek(0)
                    text = err.read()
                    if "ptxas" in text.lower():
                        pytest.skip(f"Triton's ptxas is unavailable here: {text[-500:]}")
                    raise AssertionError(f"compile child failed:\n{text[-3000:]}")
                if line.startswith("{"):
                    row = json.loads(line)
                    results[row["case"]] = row["result"]
                    pending.remove(row["case"])
                    cpu = _cpu_seconds(child.pid)
                    _timings[row["case"]] = (round(time.monotonic() - case_start, 1),
                                             None if cpu is None else round(cpu - case_cpu, 1))
                    case_start, case_cpu = time.monotonic(), cpu or 0.0
            child.wait()
    return results


_timings: dict[str, tuple] = {}  # case -> (wall seconds, CPU seconds)


@pytest.fixture(scope="module")
def compiled() -> dict:
    results = _compile_in_children(list(_cases()), CASE_CPU_LIMIT_S, CASE_WALL_LIMIT_S)
    cpu = [c for _, c in _timings.values() if c is not None]
    slowest = sorted(_timings.items(), key=lambda kv: -kv[1][0])[:3]
    print(f"sm_90 compile cases: {len(results)}, wall {sum(w for w, _ in _timings.values()):.0f} s, "
          f"CPU {sum(cpu):.0f} s; slowest (wall, CPU s): {slowest}")
    errors = [v for v in results.values() if isinstance(v, str)]
    if errors and all("ptxas" in e.lower() and "not found" in e.lower() for e in errors):
        pytest.skip(f"Triton's ptxas is unavailable here: {errors[0][:300]}")
    return results


def test_decode_tile_loop_does_not_spill(compiled):
    """The split builds' tile loop reloaded spilled registers (3 LDL per iteration) when the split epilogue stored
    acc, m and l: batch 8 x 64K/128K decode ran 11 % slower than with today's (normalized output, log-sum-exp) on an
    H100 (results/ab/h100/2026-11-24_34febff_split_epilogue.log). ptxas's allocation turns on small changes anywhere
    in the kernel, so
    this pins the property that mattered."""
    spills = {splits: compiled[f"decode-loop-spills-{splits}"] for splits in SPILL_SPLITS}
    assert not any(isinstance(v, str) for v in spills.values()), spills
    assert all(v == 0 for v in spills.values()), spills


def test_one_tile_split_builds_fit_the_programs_per_sm_the_split_rule_assumes(compiled):
    """`attention.one_tile_splits` fills a wave of DECODE_PROGRAMS_PER_SM_ONE_TILE programs per SM: if a build needed
    more registers or shared memory than that many leave (an H100 SM: 65536 registers, 228 KB), the splits past the
    resident ones would wait for a second wave (batch 1 x 16K on an H100: 22.0 us at 64 splits, 20.4 at 48). Registers
    are allocated per thread in steps of 8."""
    cases = [compiled[f"one-tile-residency-{b}"] for b in _one_tile_builds()]
    assert not [c for c in cases if isinstance(c, str)], [c for c in cases if isinstance(c, str)]
    builds = {name: build for case in cases for name, build in case.items()}
    assert builds, "no build listed"
    for name, (regs, threads, shared, per_sm, local, loop_reloads, loop_stores) in builds.items():
        assert -(-regs // 8) * 8 * threads * per_sm <= 65536, (name, regs)
        assert shared * per_sm <= 228 * 1024, (name, shared)
        # ... and fit without spilling in the tile loop (a register cap, ONE_TILE_MAXNREG, could make ptxas spill
        # instead). Outside it, some keep a spilled register or two (8-16 bytes of stack: a few stores and loads per
        # program, around the epilogue's conditional un-rotation). float16 at head_dim 128 reloads up to 8 values per
        # iteration (~1245 instructions) under its cap, stores none, keeps up to 40 bytes of stack, and was measured
        # faster that way (`Tuning.decode_programs_per_sm_one_tile`).
        f16_d128 = name.startswith("float16-d128-")
        assert loop_stores == 0, (name, loop_stores)
        assert loop_reloads <= (8 if f16_d128 else 0), (name, loop_reloads)
        assert local <= (40 if f16_d128 else 16), (name, local)


def test_merge_waits_for_the_attention_launch_before_loading_its_partials(compiled):
    """With programmatic dependent launch the merge may start while the attention launch still runs: its
    griddepcontrol.wait (SASS ACQBULK) must come before every load of the partials (an inline-asm wait carries no
    memory clobber, so this pins the order the compiler produced)."""
    from kvarn_kernels import attention

    order = compiled["merge-pdl-order"]
    assert not isinstance(order, str), order
    for splits, (wait, first_load) in order.items():
        if attention.TUNING.pdl:
            assert 0 <= wait < first_load, (splits, wait, first_load)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"{c[0]}-d{c[1]}-rows{c[2]}-{c[3]}")
def test_attention_kernel_compiles_within_shared_memory(compiled, case):
    shared = compiled[f"attention-{case}"]
    assert isinstance(shared, int), shared
    assert shared <= H100_SHARED_BYTES


def test_quantize_normalizes_k_and_v_in_the_same_register_layout(compiled):
    """V's tile is anchored in a blocked layout like the one K's select gives K (quantize.py; since 2026-11-24
    (b45bb10) one with
    4 lanes along its rows and 8 along its columns): left in the rotation gather's layout, V's normalization loop took
    2594 sm_90 instructions per iteration against K's 1797, and spilled inside the loop."""
    loops = compiled["quantize-loops"]
    assert not isinstance(loops, str), loops
    assert len(loops) == 2, loops
    (k_len, k_spills), (v_len, v_spills) = loops
    assert abs(k_len - v_len) <= 0.05 * k_len, loops
    assert k_spills == v_spills == 0, loops


@pytest.mark.parametrize("case", ["attention-one-split", "attention-one-tile", "quantize-weighted", "quantize-96"])
def test_other_variants_compile(compiled, case):
    """The attention epilogue that stores the output (one split); quantize with K-frame channel weights (and so at
    head_dim 96)."""
    shared = compiled[case]
    assert isinstance(shared, int), shared
    assert shared <= H100_SHARED_BYTES


@pytest.mark.parametrize("head_dim", MERGE_CASES)
def test_merge_kernel_fits_shared_memory(compiled, head_dim):
    shared = compiled[f"merge-{head_dim}"]
    assert isinstance(shared, int), shared
    assert shared <= H100_SHARED_BYTES


@pytest.mark.parametrize("head_dim", [64, 128])
def test_unrotating_merge_fits_shared_memory_without_spilling(compiled, head_dim):
    usage = compiled[f"merge-unrotate-{head_dim}"]
    assert not isinstance(usage, str), usage
    for splits, (shared, local) in usage.items():
        assert shared <= H100_SHARED_BYTES and local == 0, (splits, shared, local)


@pytest.mark.parametrize("case", DENSE_HISTORY_CASES, ids=lambda c: f"{c[0]}-d{c[1]}")
def test_dense_history_kernel_compiles_within_shared_memory(compiled, case):
    """The large-chunk route's dequantize kernel (float32: the test-only IEEE un-rotation)."""
    shared = compiled[f"dense-{case}"]
    assert isinstance(shared, int), shared
    assert shared <= H100_SHARED_BYTES


if __name__ == "__main__":
    _run_cases(sys.argv[1:])
