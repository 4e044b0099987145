"""Float64 numpy references written from the papers' equations and the layout of their official code.

TSV-M (Gargiulo et al. CVPR 2025; task_singular_vectors ``compute_and_sum_svd_mem_reduction``):
U, S, V of size r = min(m, n), task t's top k = r // T triplets in slots t*k .. (t+1)*k, zeros
elsewhere; result polar(U) diag(S) polar(Vh), polar(A) = P Q^T for A = P S Q^T.
Iso-C (Marczak et al. ICML 2025; iso-merging ``iso_c``): M = sum_t tau_t = U S Vh, result mean(S) U Vh.
Iso-CTS (same paper; iso-merging ``iso_cts``): common = top c of M, per task top p of
(I - Uc Uc^T) tau_t, polar of both stacks, the mean of all r collected singular values.
"""

from __future__ import annotations

import numpy as np


def polar(a: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_m(tasks: list[np.ndarray], k: int | None = None) -> np.ndarray:
    m, n = tasks[0].shape
    r = min(m, n)
    k = r // len(tasks) if k is None else k
    u_sum, s_sum, v_sum = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, tau in enumerate(tasks):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        u_sum[:, i * k:(i + 1) * k] = u[:, :k]
        s_sum[i * k:(i + 1) * k] = s[:k]
        v_sum[i * k:(i + 1) * k] = vh[:k]
    return polar(u_sum) @ np.diag(s_sum) @ polar(v_sum)


def iso_c(tasks: list[np.ndarray]) -> np.ndarray:
    u, s, vh = np.linalg.svd(sum(tasks), full_matrices=False)
    return s.mean() * u @ vh


def iso_cts(tasks: list[np.ndarray], fraction: float) -> np.ndarray:
    m, n = tasks[0].shape
    r, t = min(m, n), len(tasks)
    common = int(r * fraction)
    common = r - round((r - common) / t) * t
    per_task = (r - common) // t
    u, s, vh = np.linalg.svd(sum(tasks), full_matrices=False)
    uc = u[:, :common]
    u_all, s_all, v_all = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, tau in enumerate(tasks):
        ut, st, vht = np.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        u_all[:, i * per_task:(i + 1) * per_task] = ut[:, :per_task]
        s_all[i * per_task:(i + 1) * per_task] = st[:per_task]
        v_all[i * per_task:(i + 1) * per_task] = vht[:per_task]
    u_all[:, t * per_task:] = uc
    s_all[t * per_task:] = s[:common]
    v_all[t * per_task:] = vh[:common]
    return s_all.mean() * polar(u_all) @ polar(v_all)


def knots(tasks: dict[str, list[np.ndarray]], fraction: float, coefficients: list[float], scope: str = "model",
          eps: float = 1e-5) -> dict[str, np.ndarray]:
    """KnOTS-TIES (Stoica et al. ICLR 2025; KnOTS ``SVDMerger`` + ``ties_masking`` + ``masked_merge``):
    per tensor, [dW_1 .. dW_T] = U diag(s) [Vh_1 .. Vh_T] (s > eps), rep_t = diag(s) Vh_t; keep each
    task's int(fraction * N) largest |rep| (over all tensors for scope model); elect the sign of the
    sum of kept values; disjoint mean of c_t * kept agreeing values; dW = U merged."""
    bases, reps = {}, {}
    for name, mats in tasks.items():
        u, s, vh = np.linalg.svd(np.concatenate(mats, 1), full_matrices=False)
        keep = s > eps
        bases[name] = u[:, keep]
        reps[name] = [s[keep, None] * v for v in np.split(vh[keep], len(mats), 1)]
    names, count = list(tasks), len(coefficients)
    masks = {n: [None] * count for n in names}
    groups = [names] if scope == "model" else [[n] for n in names]
    for group in groups:
        for t in range(count):
            flat = np.concatenate([np.abs(reps[n][t]).ravel() for n in group])
            order = np.lexsort((np.arange(flat.size), -flat))
            mask = np.zeros(flat.size, bool)
            mask[order[:int(fraction * flat.size)]] = True
            offsets = np.cumsum([0] + [reps[n][t].size for n in group])
            for i, n in enumerate(group):
                masks[n][t] = mask[offsets[i]:offsets[i + 1]].reshape(reps[n][t].shape)
    out = {}
    for n in names:
        kept = np.stack([r * m for r, m in zip(reps[n], masks[n])])
        elected = np.sign(kept.sum(0))
        elected[elected == 0] = np.sign(elected.sum())
        agree = (np.sign(kept) == elected) & (kept != 0)
        c = np.asarray(coefficients)[:, None, None]
        out[n] = bases[n] @ ((kept * agree * c).sum(0) / np.maximum(agree.sum(0), 1))
    return out
