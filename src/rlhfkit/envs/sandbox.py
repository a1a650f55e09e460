"""A Python code tool that runs the model's code in a limited subprocess (an example tool).

What it limits (Linux; other POSIX systems get the rlimits only):

- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), size of files written (RLIMIT_FSIZE),
  open files (RLIMIT_NOFILE), no core dumps; wall time: the process group is killed after
  `wall_time` seconds;
- network: the child runs in new user and network namespaces (``unshare --user --net``,
  unprivileged) where no interface but a downed loopback exists; where `unshare` is missing or
  forbidden (some containers), `network_isolated()` is False and the code CAN reach the network;
- environment: an empty environment (no tokens or keys inherited), ``python -I`` (no
  PYTHON* variables, no user site-packages), a fresh temporary working directory, removed after.

What it does NOT isolate: the file system (the code runs as your user and can read, and
write, whatever you can), other processes of your user, and the host kernel. It is a guard
against runaway or careless code from a small policy, not a security boundary for hostile
code; use a container or gVisor/firejail for that.
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

_MAX_OUTPUT = 2000  # characters of stdout/stderr handed back to the model


@functools.lru_cache(maxsize=1)
def network_isolated() -> bool:
    """Whether `unshare --user --net` works here (new namespaces without privileges)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "--user", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(cpu_seconds: int, memory_mb: int):
    def apply() -> None:
        os.setsid()  # own process group: the wall-time kill takes its children too
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024 * 1024, 10 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_code(code: str, cpu_seconds: int = 2, memory_mb: int = 256, wall_time: float = 5.0) -> str:
    """Run Python `code` in the sandbox; returns its stdout (and stderr, or why it was stopped)."""
    workdir = tempfile.mkdtemp(prefix="rlhfkit-sandbox-")
    cmd = [sys.executable, "-I", "-c", code]
    if network_isolated():
        cmd = [shutil.which("unshare"), "--user", "--net", *cmd]
    try:
        proc = subprocess.Popen(cmd, cwd=workdir, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_limits(cpu_seconds, memory_mb))
        try:
            out, err = proc.communicate(timeout=wall_time)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return f"error: stopped after {wall_time:g} s of wall time"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if proc.returncode == -signal.SIGXCPU or proc.returncode == -signal.SIGKILL and not err:
        return f"error: stopped after {cpu_seconds} s of CPU time"
    text = out if proc.returncode == 0 else (out + err)
    if proc.returncode != 0 and not text.strip():
        text = f"error: exit status {proc.returncode}"
    return text[-_MAX_OUTPUT:]


def python(code: str) -> str:
    """Run a Python program and return what it prints. Limits: 2 s of CPU, 256 MB of memory, 5 s, no network.

    Args:
        code: the program; print the values you need
    """
    return run_code(code)
