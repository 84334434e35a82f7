"""Candidate pairs from SIFT visual words: pictures that share keypoints, whatever their features say.

The other rules only compare pictures whose backbone features are close (the keypoint rule: a
cosine from 0.60, each picture's 5 nearest). A copy rotated by 30 degrees with black corners,
cropped hard or recoloured can fall under that: in ``bench/audit_bench.py``'s planted copies, one
rotated copy per set (TrashNet: cosine 0.585 to its original; fruits: 0.602, its original 27th
nearest). ``audit --thorough`` also looks for pairs the way image retrieval does (Sivic and
Zisserman's "Video Google"): every picture's SIFT keypoints (``classify/audit_keypoints.py``) are
turned into visual words (``WORDS`` k-means centres of RootSIFT descriptors from
``VOCABULARY_IMAGES`` pictures), each picture into a tf-idf vector of its words, and each
picture's ``WORD_CANDIDATES`` most similar pictures become candidates for the keypoint rule (the
same geometric check, black-fill and partner conditions).

Cost: SIFT on every picture (the keypoint rule then finds the keypoints of its candidates again),
the vocabulary, and one sparse blockwise similarity pass; ``docs/bench/audit.md`` measures it.
Memory: a picture's keypoints are dropped once its words are counted; the word vectors are sparse
(at most ``KEYPOINTS`` words a picture) and compared a block of rows at a time.

    >>> pairs = word_candidates(ImageKeypoints(root, paths))      # (i, j, similarity), i < j
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from classify.audit_keypoints import ImageKeypoints
from extract.neighbours import block_rows_for, strongest_in_band, unique_pairs

WORDS = 512  # vocabulary size
VOCABULARY_IMAGES = 400  # pictures whose descriptors the vocabulary is fitted on
WORD_CANDIDATES = 2  # most similar pictures per picture handed to the keypoint rule
ROWS_AT_ONCE = 256  # pictures whose keypoints are held between their detection and their words
KEEP_KEYPOINTS = 4096  # up to this many pictures, all their keypoints stay for the keypoint rule (<= 150 KiB each)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """Hellinger-normalised SIFT (Arandjelovic and Zisserman): L1-normalise, then square root."""
    total = np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(descriptors / total).astype(np.float32)


def _descriptors(keypoints: ImageKeypoints, rows, keep: bool = False) -> list[np.ndarray]:
    keypoints.prepare(rows)
    found = [keypoints.found[int(r)] for r in rows]
    if not keep:
        keypoints.forget(rows)
    return [root_sift(k.descriptors) if k is not None and len(k.descriptors) else np.zeros((0, 128), np.float32)
            for k in found]


def fit_vocabulary(keypoints: ImageKeypoints, n: int, seed: int = 0, keep: bool = False):
    """k-means centres (``WORDS`` of them, fewer for few descriptors) of a sample of pictures'
    descriptors; ``keep``: leave the sample's keypoints in ``keypoints``."""
    from sklearn.cluster import MiniBatchKMeans

    sample = np.random.default_rng(seed).choice(n, min(n, VOCABULARY_IMAGES), replace=False)
    descriptors = np.concatenate(_descriptors(keypoints, np.sort(sample), keep))
    words = max(1, min(WORDS, len(descriptors) // 4))
    return MiniBatchKMeans(words, random_state=seed, n_init=1, max_iter=20, batch_size=4096).fit(descriptors)


def word_vectors(keypoints: ImageKeypoints, n: int, vocabulary, progress=None,
                 keep: bool = False) -> sparse.csr_matrix:
    """(n, words) tf-idf vectors of each picture's visual words, unit length (a picture without
    keypoints: a zero row). ``keep``: the keypoints stay in ``keypoints`` for the keypoint rule (no
    second detection; ``word_candidates`` keeps them up to ``KEEP_KEYPOINTS`` pictures)."""
    rows, cols = [], []
    for start in range(0, n, ROWS_AT_ONCE):
        batch = range(start, min(n, start + ROWS_AT_ONCE))
        for row, descriptors in zip(batch, _descriptors(keypoints, batch, keep)):
            if len(descriptors):
                words = vocabulary.predict(descriptors)
                rows += [row] * len(words)
                cols += words.tolist()
        if progress:
            progress(len(batch))
    counts = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, vocabulary.n_clusters))
    counts.sum_duplicates()
    idf = np.log(n / np.maximum(np.bincount(counts.indices, minlength=counts.shape[1]), 1)).astype(np.float32)
    weighted = counts @ sparse.diags(idf)
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    return sparse.csr_matrix(sparse.diags(1 / np.maximum(norms, 1e-12)) @ weighted)


def most_similar(vectors: sparse.csr_matrix, per_row: int = WORD_CANDIDATES,
                 block_rows: int | None = None) -> np.ndarray:
    """``(i, j, similarity)``, i < j, each once: every row's ``per_row`` most similar other rows
    sharing at least one word (similarity above 0), a block of rows at a time (as ``similar_pairs``)."""
    n = vectors.shape[0]
    step = block_rows or block_rows_for(n)
    transposed, parts = vectors.T.tocsc(), []
    for start in range(0, n, step):
        sims = (vectors[start:start + step] @ transposed).toarray()
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = 0  # not its own neighbour
        parts.append(strongest_in_band(sims, start, per_row, band=(np.nextafter(0, 1), np.inf)))
    return unique_pairs(parts)


def word_candidates(keypoints: ImageKeypoints, seed: int = 0, progress=None) -> np.ndarray:
    """Candidate pairs ``(i, j, similarity)`` of ``keypoints``' pictures that share visual words;
    ``progress(k)`` counts the pictures whose words are counted."""
    n = len(keypoints.paths)
    if n < 2:
        return np.zeros((0, 3))
    keep = n <= KEEP_KEYPOINTS
    vocabulary = fit_vocabulary(keypoints, n, seed, keep)
    return most_similar(word_vectors(keypoints, n, vocabulary, progress, keep))
