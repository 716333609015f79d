"""Run generated Python code in a separate, limited process and report how it ended.

Generated code (HumanEval, MBPP) is untrusted: it runs in a fresh interpreter (``python -I``) in a temporary
directory that is deleted afterwards, with

* a wall-clock limit (the whole process group is killed when it passes, so children die too),
* an address-space limit (``RLIMIT_AS``: an allocation past it raises ``MemoryError``) and a CPU-time limit,
* a cap on output (a program that floods stdout/stderr is killed as soon as it passes the cap),
* a file-size limit and no core dumps,
* no network: a new network namespace (``unshare --net``) where the kernel allows one, and in every case a
  guard that makes Python's socket connections fail.

Anything other than a clean exit with status 0 is a failure; :class:`SandboxResult` says which kind.
This is a guard against accidents and runaway programs, not a security boundary against a hostile author.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "network_isolation", "run_python"]

STATUSES = ("passed", "failed", "timeout", "memory", "output_limit")

# Runs before the program: every way the socket module opens a connection fails with a clear error.
_NO_NETWORK_PRELUDE = '''\
import socket as _kvarn_socket
def _kvarn_no_network(*args, **kwargs):
    raise OSError("network access is disabled in the kvarn sandbox")
class _KvarnNoSocket(_kvarn_socket.socket):
    def connect(self, *args, **kwargs): _kvarn_no_network()
    def connect_ex(self, *args, **kwargs): _kvarn_no_network()
    def sendto(self, *args, **kwargs): _kvarn_no_network()
    def bind(self, *args, **kwargs): _kvarn_no_network()
_kvarn_socket.socket = _KvarnNoSocket
_kvarn_socket.create_connection = _kvarn_no_network
_kvarn_socket.getaddrinfo = _kvarn_no_network
del _kvarn_socket, _KvarnNoSocket
'''


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed program ended: ``status`` is one of :data:`STATUSES`."""

    status: str
    returncode: int | None
    output: str  # the program's stdout and stderr, interleaved, cut at the output cap
    seconds: float
    isolation: str  # "netns" (own network namespace + guard) or "guard" (socket guard only)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation() -> list[str]:
    """The command prefix that gives a process its own, empty network namespace here, or [] if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    for prefix in ([exe, "--net"], [exe, "--map-root-user", "--net"]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return []


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    """preexec_fn of the child: resource limits (inherited by everything it starts)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    python: str | None = None,
) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox and return how it ended.

    ``timeout_s`` is wall-clock time, ``memory_mb`` the address-space limit, ``max_output_bytes`` the output cap.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError(f"limits must be positive: timeout_s={timeout_s}, memory_mb={memory_mb}, "
                         f"max_output_bytes={max_output_bytes}")
    prefix = network_isolation()
    isolation = "netns" if prefix else "guard"
    with tempfile.TemporaryDirectory(prefix="kvarn-sandbox-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_NO_NETWORK_PRELUDE + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*prefix, python or sys.executable, "-I", "-B", path]
        limits = functools.partial(_limits, memory_mb << 20, int(timeout_s) + 2, 16 << 20)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=limits)
        chunks: list[bytes] = []
        flooded = threading.Event()

        def read() -> None:
            total = 0
            assert proc.stdout is not None
            while block := proc.stdout.read1(65536):
                take = block[: max_output_bytes - total]
                chunks.append(take)
                total += len(block)
                if total > max_output_bytes:
                    flooded.set()
                    _kill_group(proc)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # also ends children the program left running
        proc.wait()
        reader.join(timeout=5)
        seconds = time.perf_counter() - start
        if proc.stdout is not None:
            proc.stdout.close()
    output = b"".join(chunks).decode("utf-8", "replace")
    if flooded.is_set():
        status = "output_limit"
    elif timed_out:
        status = "timeout"
    elif proc.returncode == 0:
        status = "passed"
    elif "MemoryError" in output[-4000:]:
        status = "memory"
    else:
        status = "failed"
    return SandboxResult(status, proc.returncode, output, seconds, isolation)
