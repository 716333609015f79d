"""kvarn_eval.sandbox: clean exits pass; failures, hangs, floods, memory hogs and network use are stopped and named."""

from __future__ import annotations

import socket
import time

import pytest

from kvarn_eval.sandbox import run_python


def test_clean_exit_passes_and_output_is_kept():
    r = run_python("print('hello', 6 * 7)", timeout_s=10)
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.output == "hello 42\n"


def test_failed_assert_is_a_failure():
    r = run_python("assert 1 + 1 == 3, 'arithmetic'", timeout_s=10)
    assert r.status == "failed" and r.returncode == 1
    assert "AssertionError: arithmetic" in r.output


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_hang_is_killed_at_the_time_limit(program):
    start = time.perf_counter()
    r = run_python(program, timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert r.returncode == -9
    assert 0.9 <= r.seconds < 5 and time.perf_counter() - start < 6


def test_output_flood_is_killed_at_the_cap():
    start = time.perf_counter()
    r = run_python("while True:\n    print('x' * 1000)\n", timeout_s=20, max_output_bytes=50_000)
    assert r.status == "output_limit" and not r.passed
    assert len(r.output) == 50_000 and set(r.output) <= {"x", "\n"}
    assert time.perf_counter() - start < 10  # killed at the cap, not at the time limit


def test_memory_limit_stops_a_large_allocation():
    r = run_python("x = bytearray(2 << 30)\nprint('allocated')\n", timeout_s=20, memory_mb=256)
    assert r.status == "memory" and "MemoryError" in r.output and "allocated" not in r.output


def test_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        connect = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
        r = run_python(connect, timeout_s=10)
        assert r.status == "failed" and "connected" not in r.output
        raw = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
                         "print('connected')\n", timeout_s=10)
        if raw.isolation == "netns":  # the guard covers the socket module; only a namespace stops _socket
            assert raw.status == "failed" and "connected" not in raw.output
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing reached the listener
    finally:
        listener.close()


def test_children_are_killed_with_the_program(tmp_path):
    marker = tmp_path / "alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nprint('parent done')\n"
    r = run_python(program, timeout_s=10)
    assert r.passed and "parent done" in r.output
    time.sleep(4)
    assert not marker.exists()  # the child died with the process group


def test_the_program_runs_in_an_empty_temporary_directory():
    r = run_python("import os\nprint(sorted(os.listdir('.')))\nopen('f.txt', 'w').write('x')\nprint(os.getcwd())\n")
    listing, cwd = r.output.splitlines()
    assert listing == "['program.py']" and "kvarn-sandbox-" in cwd
    assert not __import__("os").path.exists(cwd)  # removed afterwards


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0}, {"memory_mb": -1}, {"max_output_bytes": 0}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError, match="limits must be positive"):
        run_python("pass", **kwargs)
