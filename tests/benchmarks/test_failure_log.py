"""benchmarks/vllm/failure_log.py: a failed engine's cause survives the CUDA-graph capture's progress bars."""

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm" / "failure_log.py"
_spec = importlib.util.spec_from_file_location("failure_log", _path)
failure_log = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(failure_log)


def test_the_first_error_block_is_kept_and_progress_bars_dropped():
    bars = [f"Capturing CUDA graphs (decode, FULL): {i}%|###| {i}/51 [00:01<00:02, 23.5it/s]" for i in range(400)]
    text = "\n".join(["INFO start", "(EngineCore pid=1) ERROR 12-07 [core.py:1167] Traceback (most recent call last):",
                      '(EngineCore pid=1) ERROR   File "quantize.py", line 552, in _check_sources',
                      "(EngineCore pid=1) ERROR ValueError: k_src and v_src need identical strides",
                      *bars, "EngineDeadError: EngineCore encountered an issue."])
    out = failure_log.failure_excerpt(text)
    assert "ValueError: k_src and v_src need identical strides" in out
    assert "EngineDeadError" in out
    assert "it/s]" not in out
    assert len(out) < 2000


def test_without_an_error_the_tail_is_kept():
    text = "\n".join(f"line {i}" for i in range(100))
    out = failure_log.failure_excerpt(text, tail=5)
    assert out.splitlines() == [f"line {i}" for i in range(95, 100)]
