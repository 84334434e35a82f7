"""Inference streams: several batches run at once, each on a few onnxruntime threads, instead of one
batch at a time on every core.

Profiling ``extract`` (py-spy, EfficientNet-Lite0 on TrashNet, 2 cores) showed the main thread inside
``session.run`` 98 % of the loop and never waiting for decoded images: what the loop lost against the
engine alone was the engine itself running slower beside the decoding threads. One batch on two
intra-op threads splits every layer between them and joins them at its end, so a thread that a
decoding thread (or another process) takes the core from holds up the whole layer while its peer
spins. Two batches at once on one thread each have no such joins: a decode slows one batch by its own
length and nothing else, and no thread spins. ``docs/bench/int8.md`` has the measurements.

``stream_plan`` splits the inference threads into streams; ``run_in_streams`` keeps that many batches
in flight and yields the results in the order of the batches, so rows are written as before.

Example::

    streams, threads_each = stream_plan(threads=None, streams=None)  # 2 cores: (2, 1)
    for item, features in run_in_streams(engine, batches, streams, take=lambda item: item.pixels):
        write(item, features)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from extract.engine import default_threads
from extract.errors import TransferKitError

MAX_STREAMS = 4  # more batches in flight cost memory (activations per batch) for little gain
Item = TypeVar("Item")


def stream_plan(threads: int | None = None, streams: int | None = None) -> tuple[int, int]:
    """(batches run at once, intra-op threads of each) for ``threads`` inference threads in all
    (None: every core); ``streams`` None: one per thread, at most ``MAX_STREAMS``."""
    total = threads or default_threads()
    if total < 1:
        raise TransferKitError("--threads must be at least 1")
    if streams is not None and not 1 <= streams <= total:
        raise TransferKitError(f"--streams must be between 1 and the inference threads ({total})")
    streams = streams or min(MAX_STREAMS, total)
    return streams, max(1, total // streams)


def run_in_streams(compute: Callable, items: Iterable[Item], streams: int,
                   take: Callable[[Item], object] = lambda item: item) -> Iterator[tuple[Item, object]]:
    """Yield ``(item, compute(take(item)))`` in the order of ``items``, with up to ``streams`` computes
    running at once on threads (``compute`` must be thread-safe, as an onnxruntime session is).
    One stream computes in the caller's thread. An error in a compute is raised at its item."""
    if streams <= 1:
        for item in items:
            yield item, compute(take(item))
        return
    with ThreadPoolExecutor(streams, thread_name_prefix="inference") as pool:
        pending: deque = deque()
        source = iter(items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except BaseException:  # Ctrl-C or an error while the next item was made: the batches in
                while pending:  # flight are computed, so hand them over before it goes on
                    done, future = pending.popleft()
                    yield done, future.result()
                raise
            pending.append((item, pool.submit(compute, take(item))))
            if len(pending) >= streams:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
