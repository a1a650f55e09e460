"""The feedback server as feedback_load.py runs it: `rlhfkit serve run` in a subprocess (one or
several worker processes), and the CPU time of it and of PostgreSQL read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

# where several workers count their login limits (`serve run --workers N` refuses memory://);
# the load uses API tokens, so nothing is counted there during the runs
REDIS_URL = os.environ.get("FEEDBACK_LOAD_REDIS", "redis://127.0.0.1:6379/15")


def _cpu_s(stat_path: str, children: bool = False) -> float | None:
    """CPU seconds (user + system) of one process from /proc (with `children`, also those of
    its children it has waited for); None where the process or /proc is not there."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers of uvicorn's supervisor)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc/self") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and its children now alive (the supervisor and its workers)."""
    own = _cpu_s(f"/proc/{pid}/stat")
    if own is None:
        return None
    return own + sum(_cpu_s(f"/proc/{child}/stat") or 0.0 for child in _children(pid))


def _database_cpu_s() -> float | None:
    """CPU seconds of every PostgreSQL process on this machine. The server's backends that exit
    (the killed server's connections) move into the postmaster's reaped-children time, which
    is counted too, so nothing is lost when they go. None without /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        total += _cpu_s(f"/proc/{entry}/stat", children=True) or 0.0
    return total


def redis_unavailable_reason() -> str | None:
    """None when REDIS_URL answers, else why not (several workers need it)."""
    from rlhfkit.errors import ConfigError
    from rlhfkit.feedback.guard import check_storage

    try:
        check_storage(REDIS_URL)
    except ConfigError as e:
        return str(e)
    return None


class Server:
    """`rlhfkit serve run` on `port` with `workers` processes, in a session of its own so that a
    kill takes every worker with the supervisor."""

    def __init__(self, url: str, port: int, log, workers: int = 1):
        self.url, self.port, self.log, self.workers = url, port, log, workers
        self.proc: subprocess.Popen | None = None
        self._spent, self._base = 0.0, 0.0  # CPU seconds of servers killed; of this one at start

    def _now_s(self) -> float | None:
        return _tree_cpu_s(self.proc.pid) if self.proc and self.proc.poll() is None else None

    def busy_s(self) -> float | None:
        """CPU seconds the server processes spent since they became healthy (start-up and
        imports excluded), summed over restarts; None without /proc."""
        now = self._now_s()
        now = self._base if now is None else now
        return None if now is None else self._spent + now - self._base

    def start(self) -> None:
        cmd = [sys.executable, "-m", "rlhfkit.feedback.cli", "run", "--db", self.url, "--port", str(self.port),
               "--uncertainty-scorer", "none", "--log-level", "error", "--workers", str(self.workers)]
        if self.workers > 1:
            cmd += ["--rate-limit-storage", REDIS_URL]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    self._settle(deadline)
                    self._base = self._now_s() or 0.0
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see its log")
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy in 60 s")

    def _settle(self, deadline: float) -> None:
        """With several workers, the first may answer while the others still import: wait until
        all are there and their CPU stays still for half a second (every one has started)."""
        if self.workers == 1:
            return
        last = None
        while time.time() < deadline:
            now = self._now_s()
            if len(_children(self.proc.pid)) >= self.workers and now is not None and last is not None \
                    and now - last < 0.02:
                return
            last = now
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self._spent += (self._now_s() or self._base) - self._base
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
