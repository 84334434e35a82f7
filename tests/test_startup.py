"""extract.startup: library imports run in a fresh thread without the garbage collector, and what they
made is frozen."""

from __future__ import annotations

import gc
import sys
import threading

import pytest

from extract.startup import import_library


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for modules written by the test (forgotten afterwards), and the
    collector restored as the test found it (frozen objects thawed)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    enabled, before = gc.isenabled(), set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_modules_are_imported_in_another_thread_with_the_collector_off_and_frozen(module_dir):
    (module_dir / "tk_probe.py").write_text(
        "import gc, threading\n"
        "thread, collecting = threading.current_thread(), gc.isenabled()\n"
        "made = [[] for _ in range(1000)]\n")
    (module_dir / "tk_other.py").write_text("value = 7\n")
    gc.enable()
    gc.unfreeze()
    probe, other = import_library("tk_probe", "tk_other")
    assert probe.thread is not threading.current_thread() and not probe.collecting
    assert other.value == 7 and gc.isenabled()
    collected = {id(obj) for generation in range(3) for obj in gc.get_objects(generation=generation)}
    assert not collected & {id(obj) for obj in probe.made}  # no collection walks them any more
    assert gc.get_freeze_count() >= len(probe.made)


def test_an_import_error_is_raised_in_the_caller_and_the_collector_state_is_kept(module_dir):
    (module_dir / "tk_broken.py").write_text("import tk_no_such_module\n")
    gc.enable()
    with pytest.raises(ModuleNotFoundError, match="tk_no_such_module"):
        import_library("tk_broken")
    assert gc.isenabled()
    gc.disable()
    import_library("json")
    assert not gc.isenabled()
