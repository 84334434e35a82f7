"""bench/cputime.py counts the CPU of every process a command starts, however it detaches.

The command below hides CPU from ``RUSAGE_CHILDREN`` the two ways Ray's processes do: a child
reaped by the kernel because its parent ignores SIGCHLD, and a grandchild that double-forks,
calls ``setsid`` and outlives the command. Each process writes its own CPU time
(``time.process_time``, reset at fork), so the expected total is known; each burner sleeps a moment
after burning so that the /proc sampler's last look sees its whole burn.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from bench.cputime import CgroupGroup, run_tree

BURNERS = r"""
import os, signal, sys, time
out = sys.argv[1]

def burn(name, seconds):
    while time.process_time() < seconds:
        pass
    open(os.path.join(out, name), "w").write(repr(time.process_time()))
    time.sleep(0.3)  # the sampler's last look at this process sees all of its burn
    os._exit(0)

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel: their times are dropped
if os.fork() == 0:
    burn("ignored-child", 0.25)
if os.fork() == 0:  # double fork: the grandchild is re-parented and outlives the command
    if os.fork() == 0:
        os.setsid()
        burn("daemon", 0.25)
    open(os.path.join(out, "middle"), "w").write(repr(time.process_time()))
    os._exit(0)
try:
    os.wait()  # with SIGCHLD ignored: returns when every child has exited (the daemon is no child)
except ChildProcessError:
    pass
open(os.path.join(out, "command"), "w").write(repr(time.process_time()))
"""

def cgroup_writable() -> bool:
    group = CgroupGroup.create()
    if group is None:
        return False
    group.close()
    return True


METHODS = ["proc", pytest.param("cgroup", marks=pytest.mark.skipif(not cgroup_writable(),
                                                                   reason="no writable cgroup hierarchy here"))]


@pytest.mark.parametrize("method", METHODS)
def test_counts_detached_and_kernel_reaped_processes(tmp_path, method):
    run = run_tree([sys.executable, "-c", BURNERS, str(tmp_path)], method=method, interval=0.02)

    assert run.returncode == 0, run.stderr
    assert run.method == method
    reported = {p.name: float(p.read_text()) for p in tmp_path.iterdir()}
    assert set(reported) == {"ignored-child", "daemon", "middle", "command"}  # the measurement waited for all
    assert reported["ignored-child"] >= 0.25 and reported["daemon"] >= 0.25
    expected = sum(reported.values())
    assert expected - 0.1 <= run.cpu_seconds <= expected + 0.15, (run.cpu_seconds, reported)


def test_a_process_left_running_is_killed_and_reported(tmp_path):
    pid_file = tmp_path / "pid"
    script = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n"
              "    open(sys.argv[1], 'w').write(str(os.getpid()))\n    time.sleep(60)\n")
    with pytest.raises(RuntimeError, match="still running"):
        run_tree([sys.executable, "-c", script, str(pid_file)], settle_seconds=0.5)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert os.environ.get("TRANSFERKIT_CPUTIME_GROUP") is None  # the marker goes to the command only


def test_check_raises_with_the_commands_own_message():
    with pytest.raises(RuntimeError, match="failed: boom"):
        run_tree([sys.executable, "-c", "import sys; sys.exit('boom')"], check=True)
