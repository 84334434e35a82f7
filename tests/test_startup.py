"""extract.startup: library imports run without the garbage collector and leave what they made frozen."""

from __future__ import annotations

import gc

import pytest

from extract.startup import library_imports


@pytest.fixture
def collector():
    """The collector as a test found it, restored afterwards (frozen objects thawed)."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_imports_run_with_the_collector_off_and_their_objects_are_frozen(collector):
    gc.enable()
    gc.unfreeze()
    with library_imports():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]  # long-lived objects, as a module's
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made)
    collected = {id(obj) for generation in range(3) for obj in gc.get_objects(generation=generation)}
    assert not collected & {id(obj) for obj in made}  # no collection walks them any more


def test_a_disabled_collector_stays_disabled_and_an_error_still_restores_it(collector):
    gc.disable()
    with library_imports():
        pass
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(ImportError), library_imports():
        raise ImportError("no such module")
    assert gc.isenabled()
