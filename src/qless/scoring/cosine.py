"""The scoring maths on tensors: no store, no disk.

``Inf(z, z') = sum_i eta_i <q_hat(z', i), q_hat(z, i)>`` with ``q_hat = q / ||q||`` (a stored
row's scale cancels). The mean over a subtask's target examples is one dot product with the
mean of their normalised vectors, so the target side shrinks to one vector per subtask and
checkpoint (:func:`subtask_means`), and a block of pool rows costs one matmul
(:func:`block_scores`).
"""

from __future__ import annotations

import torch


def subtask_means(x: torch.Tensor, row_group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the normalised rows of ``x [n, k]`` per group (``row_group [n]``), float64 ``[n_groups, k]``,
    and the zero-norm rows (``[n]`` bool; they add nothing). Divide by group sizes for means."""
    x = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = norms == 0
    unit = x / torch.where(zero, 1.0, norms)[:, None]
    sums = torch.zeros(n_groups, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, row_group.to(x.device), unit)
    return sums, zero


def block_scores(x: torch.Tensor, subtasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-weighted scores of pool rows ``x [m, k]`` against ``subtasks [k, S]`` (already
    weighted by the checkpoint's ``eta``): ``[m, S]`` in the dtype of ``subtasks``, and the rows
    with a zero code vector (``[m]`` bool), whose scores are 0."""
    x = x.to(subtasks.dtype)
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = norms == 0
    out = (x @ subtasks) / torch.where(zero, 1.0, norms)[:, None]
    out[zero] = 0.0
    return out, zero
