"""CPU-seconds of a command and of every process it starts, however they detach or are reaped.

``RUSAGE_CHILDREN`` (even as a subreaper that waits for every orphan) misses CPU in two ways Ray hits:
a parent that ignores SIGCHLD has its children reaped by the kernel, which then discards their times,
and a process that outlives the measurement is never waited at all. Two ways that do not depend on
who waits for whom, best first:

- ``cgroup``: the command starts in a fresh control group (cgroup v1 ``cpuacct`` or cgroup v2); every
  process it forks stays in it whatever it does (double fork, ``setsid``), and the kernel charges the
  group with the CPU of every member, alive or gone. Exact; needs a writable cgroup hierarchy (root, or
  a delegated subtree).
- ``proc``: everywhere else (Linux): /proc is sampled every ``interval`` seconds; a process belongs to
  the command if it descends from it or carries the marker variable the command was started with
  (inherited through any re-parenting), and the last sample of each process counts. It misses at most
  one interval of CPU per process, and processes that live less than one interval.

The measurement ends when the command and every process of its group have exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TICKS = os.sysconf("SC_CLK_TCK")
MARKER = "TRANSFERKIT_CPUTIME_GROUP"


@dataclass
class TreeRun:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float  # from the start to the exit of the command itself
    cpu_seconds: float  # user + system of the command and every process it started
    method: str  # "cgroup" or "proc"


class CgroupGroup:
    """A fresh control group under the one this process is in; None from ``create`` if none can be made."""

    def __init__(self, path: Path, usage: Callable[[Path], float]):
        self.path, self._usage = path, usage
        self.method = "cgroup"

    @classmethod
    def create(cls) -> CgroupGroup | None:
        own = _own_cgroups()
        for mount, kind in _cgroup_mounts():
            parent = own.get(kind)
            if parent is None:
                continue
            path = Path(mount, parent.lstrip("/"), f"transferkit-cputime-{uuid.uuid4().hex[:12]}")
            try:
                path.mkdir()
            except OSError:
                continue
            group = cls(path, _cpuacct_usage if kind == "cpuacct" else _cgroup2_usage)
            try:
                group.cpu_seconds()
                return group
            except OSError:
                path.rmdir()
        return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run by a shell that first moves itself into the group, so nothing escapes it."""
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]

    def sample(self, _root: int) -> None:
        pass

    def members(self, _root: int) -> list[int]:
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def cpu_seconds(self) -> float:
        return self._usage(self.path)

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


class ProcSampler:
    """The command's processes found in /proc by descent or by the marker variable, each one's last CPU."""

    method = "proc"

    def __init__(self):
        self.token = uuid.uuid4().hex
        self._cpu: dict[tuple[int, int], float] = {}  # (pid, start tick) -> last seen user+system seconds
        self._marked: dict[tuple[int, int], bool] = {}
        self._alive: list[int] = []

    def wrap(self, cmd: list[str]) -> list[str]:
        return cmd

    def sample(self, root: int) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [pid for pid, (_, start, _) in table.items() if pid == root or self._is_marked(pid, start)]
        found: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        for pid in found:
            _, start, cpu = table[pid]
            self._cpu[(pid, start)] = cpu
        self._alive = sorted(found)

    def members(self, root: int) -> list[int]:
        self.sample(root)
        return [pid for pid in self._alive if not _is_zombie(pid)]

    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def close(self) -> None:
        pass

    def _is_marked(self, pid: int, start: int) -> bool:
        key = (pid, start)
        if key not in self._marked:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                environ = b""
            self._marked[key] = f"{MARKER}={self.token}".encode() in environ.split(b"\0")
        return self._marked[key]


def run_tree(cmd: list[str], cwd: str | Path | None = None, method: str = "auto", interval: float = 0.05,
             on_poll: Callable[[int], None] | None = None, settle_seconds: float = 120.0,
             check: bool = False) -> TreeRun:
    """Run ``cmd`` to its end and wait for every process it started; its wall time and whole-tree CPU.

    ``method``: "auto" (cgroup when one can be made, else /proc), "cgroup" or "proc". ``on_poll(pid)`` is
    called with the command's pid every ``interval`` while it runs. Processes still alive
    ``settle_seconds`` after the command exited are killed (they are the command's) and RuntimeError
    says so: a benchmark must not leave CPU burning behind it. ``check``: a failed command raises
    RuntimeError with the end of its output, so the benchmark says why.
    """
    group = CgroupGroup.create() if method in ("auto", "cgroup") else None
    if group is None and method == "cgroup":
        raise RuntimeError("no writable cgroup hierarchy here: use method='proc'")
    group = group or ProcSampler()
    env = {**os.environ, MARKER: group.token} if isinstance(group, ProcSampler) else None
    try:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            start = time.perf_counter()  # files, not pipes: a daemon holding a pipe open would block us
            proc = subprocess.Popen(group.wrap(cmd), cwd=cwd, env=env, stdout=out, stderr=err, text=True)
            while proc.poll() is None:
                group.sample(proc.pid)
                if on_poll:
                    on_poll(proc.pid)
                time.sleep(interval)
            wall = time.perf_counter() - start
            leftovers = _settle(group, proc.pid, interval, settle_seconds)
            cpu = group.cpu_seconds()
            out.seek(0), err.seek(0)
            result = TreeRun(proc.returncode, out.read(), err.read(), wall, cpu, group.method)
    finally:
        group.close()
    if leftovers:
        raise RuntimeError(f"processes {leftovers} started by `{' '.join(cmd)}` were still running "
                           f"{settle_seconds:.0f} s after it exited; killed")
    if check and result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def _settle(group: CgroupGroup | ProcSampler, root: int, interval: float, timeout: float) -> list[int]:
    """Wait until the group is empty; kill what is left after ``timeout``. Returns the killed pids."""
    deadline = time.monotonic() + timeout
    while (alive := group.members(root)) and time.monotonic() < deadline:
        time.sleep(interval)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    while alive and group.members(root) and time.monotonic() < deadline + 10:
        time.sleep(interval)
    return alive


def _proc_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, start tick, user+system seconds) of every process now in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # after "pid (comm)": state ppid ...; utime, stime are fields 14, 15 and starttime 22 of stat(5)
            table[int(entry.name)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICKS)
    return table


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _own_cgroups() -> dict[str, str]:
    """Controller ('cpuacct' or 'unified') -> this process's group path, from /proc/self/cgroup."""
    groups = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            groups["unified"] = path
        elif "cpuacct" in controllers.split(","):
            groups["cpuacct"] = path
    return groups


def _cgroup_mounts() -> list[tuple[str, str]]:
    """(mount point, 'cpuacct' or 'unified') of the cgroup hierarchies that account CPU, v1 first."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, options = line.split()[:4]
        if fstype == "cgroup" and "cpuacct" in options.split(","):
            mounts.insert(0, (point, "cpuacct"))
        elif fstype == "cgroup2":
            mounts.append((point, "unified"))
    return mounts


def _cpuacct_usage(path: Path) -> float:
    return int((path / "cpuacct.usage").read_text()) / 1e9


def _cgroup2_usage(path: Path) -> float:
    for line in (path / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    raise OSError(f"no usage_usec in {path / 'cpu.stat'}")
