"""The arithmetic of TSV-M, Iso-C and Iso-CTS on one 2-D tensor's task matrices.

Every function takes one tensor's task matrices ``tau_t`` (each ``[m, n]``, floating point), their
coefficients ``c_t`` (each source's lambda) and the computation dtype, and returns the merged task
matrix ``[m, n]`` in that dtype. The methods work on the weighted matrices ``c_t * tau_t`` (per-task
scaling before the SVD, as FusionBench's list-valued ``alpha``); each is formed when it is needed,
so at most one weighted copy (or one running sum) is alive beside the inputs.

Sources:
- TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025 (arXiv 2412.00081); official code ``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``
  (AntoAndGar/task_singular_vectors a6c97188).
- Iso-C, Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959); official code
  ``src/utils/iso.py`` (danielm1405/iso-merging d34010af), copied by FusionBench
  ``isotropic_merging/iso_utils.py``.

One deliberate difference from the reference code: singular directions whose singular value is
numerically zero (at most ``max(m, n) * eps * sigma_max``, the usual numerical-rank tolerance) are
left out of the orthogonalisation and the reconstruction. Their vectors are whatever LAPACK
returns for a zero singular value; the references keep them, so a zero or rank-deficient task
vector rotates the other tasks' blocks (TSV-M) or adds an arbitrary rank completion at the flat
singular value (Iso). For task matrices of full numerical rank nothing changes.
"""

from __future__ import annotations

import torch


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``x = U diag(S) Vh``: U ``[m, r]``, S ``[r]`` descending, Vh ``[r, n]``."""
    return torch.linalg.svd(x, full_matrices=False)


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above ``max(m, n) * eps * s[0]`` (0 for a zero matrix)."""
    if s.numel() == 0:
        return 0
    tol = max(shape) * torch.finfo(s.dtype).eps * float(s[0])
    return int((s > tol).sum())


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of ``a`` ``[m, k]``: ``P Q^T`` for ``a = P S Q^T``, the nearest
    matrix with orthonormal columns (rows, when m < k) in Frobenius norm (the Procrustes solution)."""
    p, _, qh = _svd(a)
    return p @ qh


def _weighted(tau: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    return tau.to(dtype) * c


def _weighted_sum(tasks: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``sum_t c_t tau_t`` accumulated in place, ``[m, n]`` in ``dtype``."""
    out = _weighted(tasks[0], coefficients[0], dtype)
    for tau, c in zip(tasks[1:], coefficients[1:]):
        out.add_(tau.to(dtype), alpha=c)
    return out


def tsv_m(tasks: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype,
          small_rank: str = "mean") -> torch.Tensor:
    """TSV-M of one tensor: per task the top ``k = r // T`` singular triplets, ``r = min(m, n)``;
    ``U = [U_1 .. U_T]`` ``[m, Tk]``, ``S = diag(s_1 .. s_T)``, ``Vh = [Vh_1; ..; Vh_T]`` ``[Tk, n]``;
    result ``polar(U) S polar(Vh)``.

    The reference code pads U to ``[m, r]`` with zero columns when ``T k < r``; their singular
    values are zero, so the padding does not change the product and is not built here.
    ``k == 0`` (``r < T``): ``small_rank`` = ``mean`` returns the mean of the task matrices (as for
    1-D tensors), ``zero`` returns zeros (what the reference code's ``k = 0`` gives).
    """
    m, n = tasks[0].shape
    k = min(m, n) // len(tasks)
    if k == 0:
        if small_rank == "mean":
            return mean(tasks, coefficients, dtype)
        return torch.zeros(m, n, dtype=dtype)
    us, ss, vhs = [], [], []
    for tau, c in zip(tasks, coefficients):
        u, s, vh = _svd(_weighted(tau, c, dtype))
        keep = min(k, _numerical_rank(s, (m, n)))
        us.append(u[:, :keep].clone())  # a copy, so that the full U and Vh are freed now
        ss.append(s[:keep].clone())
        vhs.append(vh[:keep].clone())
        del u, s, vh
    if sum(s.numel() for s in ss) == 0:
        return torch.zeros(m, n, dtype=dtype)
    u_cat = torch.cat(us, 1)
    del us
    u_orth = polar_factor(u_cat)
    del u_cat
    vh_cat = torch.cat(vhs, 0)
    del vhs
    vh_orth = polar_factor(vh_cat)
    del vh_cat
    return (u_orth * torch.cat(ss)) @ vh_orth


def iso_c(tasks: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Iso-C of one tensor: ``M = sum_t c_t tau_t = U diag(S) Vh``; result ``mean(S) U Vh`` (the
    spectrum replaced by its mean over all ``r = min(m, n)`` singular values)."""
    total = _weighted_sum(tasks, coefficients, dtype)
    u, s, vh = _svd(total)
    del total
    if s.numel() == 0:
        return torch.zeros(tuple(tasks[0].shape), dtype=dtype)
    rho = _numerical_rank(s, tuple(tasks[0].shape))
    return (u[:, :rho] * s.mean()) @ vh[:rho]


def iso_cts_sizes(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common size, size per task) as the reference code chooses them: the common part starts
    at ``int(r * fraction)``, the rest is rounded (Python's round) to a multiple of the number of
    tasks, and the common part takes what is left, so that the two fill ``r`` exactly. Where that
    rounding would ask for more than ``r`` (few dimensions, many tasks) the per-task size shrinks."""
    common = int(r * common_space_fraction)
    per_task = min(round((r - common) / tasks), r // tasks)
    return r - per_task * tasks, per_task


def iso_cts(tasks: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype,
            common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS of one tensor: the top ``c`` singular triplets of ``M = sum_t c_t tau_t`` (common
    subspace), and per task the top ``p`` triplets of ``(I - U_c U_c^T) c_t tau_t`` (its part outside
    the common subspace), ``c + T p = r``; ``U`` and ``Vh`` of all blocks orthogonalised by their
    polar factors; the spectrum replaced by the mean of all ``r`` collected singular values."""
    m, n = tasks[0].shape
    r = min(m, n)
    if r == 0:
        return torch.zeros(m, n, dtype=dtype)
    common, per_task = iso_cts_sizes(r, len(tasks), common_space_fraction)
    total = _weighted_sum(tasks, coefficients, dtype)
    u, s, vh = _svd(total)
    del total
    keep = min(common, _numerical_rank(s, (m, n)))
    u_c, vh_c = u[:, :keep], vh[:keep]
    us, ss, vhs = [u_c], [s[:common]], [vh_c]
    del u, vh
    if per_task:
        for tau, c in zip(tasks, coefficients):
            residual = _weighted(tau, c, dtype)
            residual -= u_c @ (u_c.T @ residual)
            ut, st, vht = _svd(residual)
            del residual
            keep_t = min(per_task, _numerical_rank(st, (m, n)))
            us.append(ut[:, :keep_t].clone())  # copies: the full factors are freed now
            vhs.append(vht[:keep_t].clone())
            ss.append(st[:per_task].clone())
            del ut, st, vht
    flat = torch.cat(ss).sum() / r
    u_cat = torch.cat(us, 1)
    if u_cat.shape[1] == 0 or float(flat) == 0.0:
        return torch.zeros(m, n, dtype=dtype)
    del us
    u_orth = polar_factor(u_cat)
    del u_cat
    vh_orth = polar_factor(torch.cat(vhs, 0))
    return (u_orth * flat) @ vh_orth


def mean(tasks: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``(1/T) sum_t c_t tau_t`` (any shape): how all three methods merge non-2-D tensors."""
    return _weighted_sum(tasks, coefficients, dtype).div_(len(tasks))
