"""A small numpy network: dense layers, ReLU, dropout, softmax; Adam with early stopping.

Numpy rather than Keras because a head over a few thousand feature vectors trains in seconds on a
CPU, starts without importing TensorFlow, and is bit-for-bit deterministic: one seeded generator
drives initialisation, shuffling and dropout, so the same seed gives the same weights.

Training runs BLAS on one thread: mini-batch products are too small to gain from more, and on a
busy 2-core machine OpenBLAS threads waiting for a core made the mlp head 4-7x slower (14 s vs 2 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

Layers = list[tuple[np.ndarray, np.ndarray]]  # [(W (in, out), b (out,)), ...]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logits(layers: Layers, X: np.ndarray) -> np.ndarray:
    """The network before its softmax: ReLU between layers (the ONNX graph's math)."""
    h = X
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def forward(layers: Layers, X: np.ndarray) -> np.ndarray:
    """Probabilities of the network."""
    return softmax(logits(layers, X))


def fold_standardisation(mean: np.ndarray, scale: np.ndarray, layers: Layers) -> Layers:
    """Layers on raw features equal to ``layers`` applied to ``(x - mean) / scale`` (folded in float64)."""
    W, b = (np.asarray(a, np.float64) for a in layers[0])
    W_raw = W / np.asarray(scale, np.float64)[:, None]
    b_raw = b - np.asarray(mean, np.float64) @ W_raw
    return [(W_raw.astype(np.float32), b_raw.astype(np.float32)), *layers[1:]]


def cross_entropy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


@dataclass
class DenseFit:
    layers: Layers
    best_epoch: int  # epoch (1-based) whose weights were kept
    epochs: int  # epochs run before early stopping
    best_val_loss: float


class _Adam:
    """Adam, in place: the same arithmetic as the textbook update, without a temporary per operation
    (the update of a 1280 x 256 layer is memory-bound and was a third of the mlp head's time)."""

    def __init__(self, params: list[np.ndarray], learning_rate: float):
        self.lr = learning_rate
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.buffers = [(np.empty_like(p), np.empty_like(p)) for p in params]
        self.t = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], b1=0.9, b2=0.999, eps=1e-8) -> None:
        self.t += 1
        lr = float(self.lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t))  # the update is float32
        for p, g, m, v, (a, b) in zip(params, grads, self.m, self.v, self.buffers):
            m *= b1
            m += np.multiply(g, 1 - b1, out=a)
            v *= b2
            np.multiply(g, 1 - b2, out=a)
            v += np.multiply(a, g, out=a)  # (1 - b2) * g * g, in that order
            np.sqrt(v, out=b)
            b += eps
            np.multiply(m, lr, out=a)
            p -= np.divide(a, b, out=a)  # lr * m / (sqrt(v) + eps)


def _init_layers(sizes: list[int], rng: np.random.Generator) -> Layers:
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
        layers.append((rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32),
                       np.zeros(fan_out, np.float32)))
    return layers


def _gradients(layers: Layers, X: np.ndarray, y: np.ndarray, dropout: float, l2: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Gradients of mean cross-entropy + l2/2 * |W|^2, in the order W0, b0, W1, b1..."""
    inputs, masks = [], []
    h = X
    for i, (W, b) in enumerate(layers):
        inputs.append(h)
        h = h @ W + b
        if i < len(layers) - 1:
            mask = (h > 0).astype(np.float32)
            if dropout:
                mask *= (rng.random(h.shape) >= dropout) / np.float32(1 - dropout)
            h = h * mask
            masks.append(mask)
    delta = softmax(h)
    delta[np.arange(len(y)), y] -= 1
    delta /= len(y)
    grads: list[np.ndarray] = []
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        grads[:0] = [inputs[i].T @ delta + l2 * W, delta.sum(axis=0)]
        if i:
            delta = (delta @ W.T) * masks[i - 1]
    return grads


def train_dense(
    X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int,
    hidden: tuple[int, ...], dropout: float, learning_rate: float, l2: float, batch_size: int,
    max_epochs: int, patience: int, seed: int, on_epoch: Callable[[int], None] | None = None,
) -> DenseFit:
    """Mini-batch Adam; stops when the validation loss has not improved for ``patience`` epochs
    and returns the weights of the best epoch. ``on_epoch(epoch)`` after each epoch (1-based)."""
    rng = np.random.default_rng(seed)
    X = np.asarray(X, np.float32)
    X_val = np.asarray(X_val, np.float32)
    layers = _init_layers([X.shape[1], *hidden, n_classes], rng)
    params = [p for layer in layers for p in layer]
    adam = _Adam(params, learning_rate)
    best = (np.inf, 0, [p.copy() for p in params])
    epoch = 0
    with threadpool_limits(limits=1, user_api="blas"):
        for epoch in range(1, max_epochs + 1):
            order = rng.permutation(len(X))
            for start in range(0, len(X), batch_size):
                batch = order[start:start + batch_size]
                adam.step(params, _gradients(layers, X[batch], y[batch], dropout, l2, rng))
            val_loss = cross_entropy(forward(layers, X_val), y_val)
            if on_epoch is not None:
                on_epoch(epoch)
            if val_loss < best[0] - 1e-4:
                best = (val_loss, epoch, [p.copy() for p in params])
            elif epoch - best[1] >= patience:
                break
    kept = best[2]
    return DenseFit(layers=[(kept[i], kept[i + 1]) for i in range(0, len(kept), 2)], best_epoch=best[1],
                    epochs=epoch, best_val_loss=float(best[0]))
