"""Task weights: uniform, performance (softmax of accuracies) and cluster (equal per cluster).

Every mode returns weights that sum to 1; the merge is lambda * sum_t w_t tau_t, so lambda = 1
is a weighted average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MODES = ("uniform", "performance", "cluster")


def uniform(num_tasks: int) -> list[float]:
    return [1.0 / num_tasks] * num_tasks


def performance(accuracies: Sequence[float], temperature: float) -> list[float]:
    """softmax(acc_t / temperature): better tasks weigh more; a high temperature tends to uniform."""
    a = np.asarray(accuracies, dtype=np.float64) / temperature
    e = np.exp(a - a.max())
    return (e / e.sum()).tolist()


def cluster_weights(labels: Sequence[int]) -> list[float]:
    """Each of C clusters weighs 1/C, split equally among its tasks (merge within, then across)."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [1.0 / (len(counts) * counts[label]) for label in labels]


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    return gram / np.outer(norms, norms)


def cluster_tasks(gram: np.ndarray, n_clusters: int, method: str, seed: int = 0) -> list[int]:
    """Cluster labels (0..C-1, numbered by first appearance) from the tasks' Gram matrix.

    ``kmeans`` runs on an embedding whose inner products are the cosine similarities (the
    normalised task vectors up to a rotation, so Euclidean k-means on it is k-means on the task
    vectors themselves); ``hierarchical`` is average linkage on the distance 1 - cosine.
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans

    cos = cosine_matrix(np.asarray(gram, dtype=np.float64))
    n = cos.shape[0]
    k = max(1, min(n_clusters, n))
    if k == 1:
        return [0] * n
    if method == "kmeans":
        evals, evecs = np.linalg.eigh(cos)
        embedding = evecs * np.sqrt(np.clip(evals, 0.0, None))
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)
    elif method == "hierarchical":
        distance = np.clip(1.0 - cos, 0.0, None)
        np.fill_diagonal(distance, 0.0)
        raw = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
    else:
        raise ValueError(f"unknown cluster method {method!r}; use kmeans or hierarchical")
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in raw]


def task_accuracies(accuracies: Mapping[str, float] | Sequence[float], tasks: Sequence[str]) -> list[float]:
    """Accuracies in task order, from a mapping by task name or a list in source order."""
    if isinstance(accuracies, Mapping):
        missing = [t for t in tasks if t not in accuracies]
        if missing:
            raise KeyError(missing[0])
        return [float(accuracies[t]) for t in tasks]
    values = [float(a) for a in accuracies]
    if len(values) != len(tasks):
        raise IndexError(len(values))
    return values
