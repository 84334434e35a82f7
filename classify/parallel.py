"""``fit-head --kind all`` on every core to the end: kinds fitted side by side, idle threads helping.

The kinds are fitted side by side, a thread each, as many threads as cores. A head's search is a
set of independent fits (a setting on a fold, a fold's C path, a fold of the mlp's CV), which it
hands to ``map_tasks``: the thread that asks runs them one by one, and a thread with no kind left
to start takes the ones not started yet, so the last kind to finish does not leave a core idle.
Threads are enough: libsvm, BLAS products and numpy's loops release the GIL.

Results come back in task order and each fit runs with BLAS on one thread, so they do not depend
on which thread ran what. When a fit fails, or on Ctrl-C, no more fits start: the running ones end
(libsvm cannot be interrupted) and the error is raised.

    >>> run_side_by_side(fit_kind, ["mlp", "rbf", "svm", "softmax"], n_threads=2)  # fit_kind calls map_tasks
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Iterable, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Stopped(Exception):
    """The fits were stopped (another failed, or Ctrl-C) before this one's tasks were all done."""


class _Batch(Generic[Task, Result]):
    """One ``map_tasks`` call: tasks taken in order by its own thread and by helpers."""

    def __init__(self, run: Callable[[Task], Result], tasks: list[Task]):
        self.run, self.tasks = run, tasks
        self.results: list = [None] * len(tasks)
        self.error: BaseException | None = None
        self.started = self.ended = 0
        self.changed = threading.Condition()

    def take(self) -> int | None:
        """The index of a task not started yet (None: all started, or stopped)."""
        with self.changed:
            if self.started == len(self.tasks) or self.error or _stopping.is_set():
                return None
            self.started += 1
            return self.started - 1

    def do(self, index: int) -> None:
        try:
            result, error = self.run(self.tasks[index]), None
        except BaseException as exc:  # handed to the thread that asked (KeyboardInterrupt included)
            result, error = None, exc
        with self.changed:
            self.results[index] = result
            self.error = self.error or error
            self.ended += 1
            self.changed.notify_all()

    def wait(self) -> list[Result]:
        with self.changed:
            self.changed.wait_for(lambda: self.ended == self.started)
        if self.error:
            raise self.error
        if self.ended < len(self.tasks):
            raise Stopped("fits stopped before all were done")
        return self.results


_sharing = False  # inside run_side_by_side: batches are open to helpers
_open: list[_Batch] = []  # batches with tasks, oldest first
_news = threading.Condition()  # guards _open and _running; notified when either changes
_running = 0  # items of run_side_by_side not finished
_stopping = threading.Event()


def map_tasks(run: Callable[[Task], Result], tasks: Iterable[Task], n_jobs: int = 1) -> list[Result]:
    """``[run(task) for task in tasks]``, in that order; inside ``run_side_by_side`` idle threads take
    some of them, elsewhere ``n_jobs`` threads of its own do (1: this one)."""
    batch = _Batch(run, list(tasks))
    if not _sharing and n_jobs <= 1:
        return [run(task) for task in batch.tasks]
    if not _sharing:
        with ThreadPoolExecutor(n_jobs) as pool:
            return list(pool.map(run, batch.tasks))
    with _news:
        _open.append(batch)
        _news.notify_all()
    try:
        while (index := batch.take()) is not None:
            batch.do(index)
        return batch.wait()
    finally:
        with _news:
            _open.remove(batch)


def _help() -> None:
    """Run tasks of other threads' batches (the oldest first) while some item is still running."""
    while not _stopping.is_set():
        with _news:
            batches = list(_open)
            if _running == 0:
                return
        for batch in batches:
            index = batch.take()
            if index is not None:
                batch.do(index)
                break
        else:
            with _news:  # nothing to take: wait for a new batch or an item's end
                _news.wait(timeout=0.05)


def run_side_by_side(run: Callable[[Task], Result], items: list[Task], n_threads: int) -> list[Result]:
    """``[run(item) for item in items]`` on ``n_threads`` threads, started in ``items`` order; a thread
    with no item left to start helps with the others' ``map_tasks``. On an error or Ctrl-C, no
    more fits start and this waits for the running ones before raising."""
    global _sharing, _running
    if _sharing:
        raise RuntimeError("run_side_by_side does not nest")
    results: list = [None] * len(items)
    queue = iter(range(len(items)))
    taking = threading.Lock()

    def work() -> None:
        global _running
        while True:
            with taking:
                index = next(queue, None)
            if index is None:
                return _help()
            try:
                results[index] = run(items[index])
            finally:
                with _news:
                    _running -= 1
                    _news.notify_all()

    _stopping.clear()
    _sharing, _running = True, len(items)
    try:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="fit") as pool:
            try:  # Ctrl-C may come while the workers are submitted, too
                for worker in [pool.submit(work) for _ in range(n_threads)]:
                    worker.result()
            except BaseException:
                _stopping.set()  # no fit starts any more; leaving the pool waits for the running ones
                raise
        return results
    finally:
        _sharing = False
