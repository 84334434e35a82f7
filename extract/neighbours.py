"""Pairs of rows whose features are nearly identical, without the whole similarity matrix.

    >>> unit = normalise(features)
    >>> pairs = similar_pairs(unit, threshold=0.95)      # (i, j, cosine) with i < j
    >>> groups = connected_groups(len(unit), pairs)      # lists of row indices, 2+ rows each

Cosine similarity is computed block by block: each block of ``block_rows`` rows is multiplied
by the rows after it (the upper triangle only), and only the pairs above the threshold are kept.
Memory is ``block_rows x n`` floats at a time (``block_rows`` is chosen to keep that near
``BLOCK_BYTES``), never ``n x n``; time is about n²·dim/2 multiply-adds (measured in
``bench/audit_bench.py``).
"""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 * 2**20  # one block of similarities: 64 MiB whatever the number of rows
NEAR_DUPLICATE_COSINE = 0.90  # centred features; measured in bench/audit_bench.py (see classify/duplicates.py)


def normalise(features: np.ndarray, centre: bool = True) -> np.ndarray:
    """Unit-length rows, centred on the mean row first.

    Backbone features after ReLU are all positive, so raw cosines between unrelated images are
    already high (0.6-0.8); centring spreads them out and keeps the duplicate threshold meaningful.
    """
    x = np.array(features, dtype=np.float32)  # one copy; everything below is in place
    if centre:
        x -= x.mean(axis=0, keepdims=True)
    x /= np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]  # no n x dim temporary
    return x


def block_rows_for(n: int, block_bytes: int = BLOCK_BYTES) -> int:
    return int(max(1, min(n, block_bytes // (4 * max(n, 1)))))


def similar_pairs(unit: np.ndarray, threshold: float, others: np.ndarray | None = None,
                  block_rows: int | None = None, progress=None) -> np.ndarray:
    """Pairs ``(i, j, cosine)`` with cosine >= ``threshold``, as an ``(m, 3)`` float64 array.

    Without ``others``: pairs of rows of ``unit`` with ``i < j``. With ``others`` (same row count,
    e.g. the features of the mirrored images): pairs ``unit[i]`` x ``others[j]`` with ``i != j``
    (both orders, so the caller can keep the larger of the two similarities).
    ``progress`` is called with the number of rows done after each block.
    """
    n = len(unit)
    target = unit if others is None else others
    step = block_rows or block_rows_for(n)
    found = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        columns = slice(start + 1, n) if others is None else slice(0, n)
        sims = unit[start:stop] @ target[columns].T
        rows, cols = np.nonzero(sims >= threshold)
        cols = cols + columns.start
        rows = rows + start
        keep = rows < cols if others is None else rows != cols
        found.append(np.column_stack([rows[keep], cols[keep], sims[rows[keep] - start, cols[keep] - columns.start]]))
        if progress:
            progress(stop - start)
    return np.concatenate(found) if found else np.zeros((0, 3))


def nearest_other(unit: np.ndarray, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the index and cosine of its most similar other row (blockwise)."""
    index, best, _ = nearest_two(unit, block_rows)
    return index, best


def nearest_two(unit: np.ndarray, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row, the index and cosine of its most similar other row, and the second-best cosine."""
    return similar_and_nearest(unit, np.inf, block_rows)[1]


def similar_and_nearest(unit: np.ndarray, threshold: float, block_rows: int | None = None, progress=None,
                        per_row: int = 0, band: tuple[float, float] = (-np.inf, np.inf)):
    """``similar_pairs(unit, threshold)``, ``nearest_two(unit)`` and ``strongest_in_band`` in one
    blockwise pass (each block of rows against every row: the cost of one full pass instead of a
    half and a full one). Returns ``(pairs, (index, best, second), strongest)``; ``strongest`` is
    empty unless ``per_row`` is given."""
    n = len(unit)
    step = block_rows or block_rows_for(n)
    index = np.zeros(n, dtype=np.int64)
    best = np.full(n, -np.inf, dtype=np.float32)
    second = np.full(n, -np.inf, dtype=np.float32)
    found, strongest = [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        sims = unit[start:stop] @ unit.T
        rows = np.arange(stop - start)
        sims[rows, np.arange(start, stop)] = -np.inf
        pair_rows, cols = np.nonzero(sims >= threshold)
        keep = pair_rows + start < cols
        found.append(np.column_stack([pair_rows[keep] + start, cols[keep], sims[pair_rows[keep], cols[keep]]]))
        if per_row:
            strongest.append(strongest_in_band(sims, start, per_row, band))
        index[start:stop] = sims.argmax(axis=1)
        best[start:stop] = sims[rows, index[start:stop]]
        sims[rows, index[start:stop]] = -np.inf
        second[start:stop] = sims.max(axis=1)
        if progress:
            progress(stop - start)
    pairs = np.concatenate(found) if found else np.zeros((0, 3))
    return pairs, (index, best, second), unique_pairs(strongest)


def strongest_in_band(sims: np.ndarray, start: int, per_row: int, band: tuple[float, float]) -> np.ndarray:
    """``(i, j, cosine)``: each block row's ``per_row`` most similar rows with ``band[0] <= cosine < band[1]``."""
    k = min(per_row, sims.shape[1])
    inside = np.where((sims >= band[0]) & (sims < band[1]), sims, -np.inf)
    cols = np.argpartition(-inside, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(inside, cols, axis=1)
    rows, slot = np.nonzero(values > -np.inf)
    return np.column_stack([rows + start, cols[rows, slot], values[rows, slot]])


def unique_pairs(parts: list[np.ndarray]) -> np.ndarray:
    """Pairs ``(i, j, similarity)`` with i < j, each once, most similar first."""
    if not parts or not sum(len(p) for p in parts):
        return np.zeros((0, 3))
    pairs = np.concatenate(parts)
    pairs[:, :2] = np.sort(pairs[:, :2], axis=1)
    _, first = np.unique(pairs[:, :2], axis=0, return_index=True)
    unique = pairs[first]
    return unique[np.argsort(-unique[:, 2], kind="stable")]


def mutual_nearest_pairs(unit: np.ndarray, block_rows: int | None = None, nearest=None) -> np.ndarray:
    """``(i, j, cosine, margin)``, i < j, for rows that are each other's nearest other row; margin:
    how much their cosine beats the next-nearest row of either (small inside a dense cluster).
    ``nearest``: ``nearest_two(unit)`` when already computed."""
    index, best, second = nearest if nearest is not None else nearest_two(unit, block_rows)
    rows = np.flatnonzero((index[index] == np.arange(len(index))) & (np.arange(len(index)) < index))
    margin = best[rows] - np.maximum(second[rows], second[index[rows]])
    return np.column_stack([rows, index[rows], best[rows], margin]).astype(np.float64).reshape(-1, 4)


def connected_groups(n: int, pairs) -> list[list[int]]:
    """Connected components (2+ rows) of the graph whose edges are ``pairs`` (first two columns).

    Each group sorted; groups sorted by their first row.
    """
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in ((int(p[0]), int(p[1])) for p in pairs):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


def exact_pairs(sha256: list[str | None]) -> np.ndarray:
    """Pairs ``(first row with this hash, row, 1.0)`` for rows whose content hash repeats (None skipped)."""
    first: dict[str, int] = {}
    pairs = []
    for i, sha in enumerate(sha256):
        if sha is None:
            continue
        if sha in first:
            pairs.append((first[sha], i, 1.0))
        else:
            first[sha] = i
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 3)
