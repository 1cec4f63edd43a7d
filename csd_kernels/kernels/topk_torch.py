"""PyTorch backend of the top-k losses' student pass: the reference semantics, chunked over the vocabulary.

What both backends compute (the maths is in `topk_triton.py`'s header): per row, the student logits at
the support ids and the log-sum-exp of the student logits off the support (the tail bucket); and the
gradient of those back onto the full row. `ids` is (N, K) int32, -1 where an entry is not in the support
(padding); an id >= V gives NaN. Here the tail is exact by construction: each chunk of columns has its
support entries set to -inf (a scatter into an (N, chunk + 1) mask, the extra column catching the ids of
other chunks) before an online log-sum-exp.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .torch_backend import _chunk, _chunk_size, _compute_dtype


def support_logits(student: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s[id] per support entry (N, K): -inf for padding (-1), NaN for an id >= V. Reads K entries a row."""
    vocab = student.shape[-1]
    ids = ids.long()
    in_range = (ids >= 0) & (ids < vocab)
    index = torch.where(in_range, ids, 0).view(*student.shape[:-1], ids.shape[-1])
    picked = student.gather(-1, index).reshape(ids.shape).to(dtype)
    return torch.where(in_range, picked, torch.where(ids < 0, -math.inf, math.nan))


def _chunk_positions(ids: torch.Tensor, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(column within the chunk or `stop - start` for ids elsewhere, whether the id is in this chunk)."""
    here = (ids >= start) & (ids < stop)
    return torch.where(here, ids - start, stop - start), here


def student_pass(student: torch.Tensor, ids: torch.Tensor, active: torch.Tensor,
                 stream: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(support (N, K), tail (N,)) in the compute dtype; tail is -inf without `stream` or off-support
    entries. Rows not `active` are computed too (the results are masked by the caller)."""
    n_rows, vocab = ids.shape[0], student.shape[-1]
    dtype = _compute_dtype(student)
    support = support_logits(student, ids, dtype)
    m = torch.full((n_rows,), -math.inf, dtype=dtype, device=student.device)
    z = torch.zeros(n_rows, dtype=dtype, device=student.device)
    if not stream or n_rows == 0:
        return support, m
    ids = ids.long()
    size = _chunk_size(n_rows, vocab, student.device)
    for start in range(0, vocab, size):
        stop = min(start + size, vocab)
        x = _chunk(student, start, stop, n_rows, dtype)
        column, _ = _chunk_positions(ids, start, stop)
        excluded = torch.zeros(n_rows, stop - start + 1, dtype=torch.bool, device=x.device)
        excluded.scatter_(1, column, True)
        x = x.masked_fill(excluded[:, :-1], -math.inf)
        m_new = torch.maximum(m, x.amax(dim=1))
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)  # an all -inf prefix: no rescale, no NaN
        z = z * torch.exp(m - m_safe) + torch.exp(x - m_safe[:, None]).sum(dim=1)
        m = m_new
    # z == 0: no finite entry off the support; a NaN logit off the support makes z NaN, and the tail too.
    return support, torch.where(z == 0, -math.inf, torch.where(m == -math.inf, 0.0, m) + torch.log(z))


def student_backward(student: torch.Tensor, ids: torch.Tensor, active: torch.Tensor,
                     labels: Optional[torch.Tensor], tail: torch.Tensor, coef: torch.Tensor,
                     values: torch.Tensor, label_grad: Optional[torch.Tensor], stream: bool) -> torch.Tensor:
    """The gradient on the full row (student's shape and dtype): coef * exp(s_j - tail) off the support
    (plus `label_grad` at the label), `values` at the support ids, 0 in rows not `active`."""
    n_rows, vocab = ids.shape[0], student.shape[-1]
    dtype = _compute_dtype(student)
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    flat = out.view(n_rows, vocab)
    if n_rows == 0:
        return out
    ids = ids.long()
    keep = active[:, None]
    tail_safe = torch.where(tail == -math.inf, 0.0, tail).to(dtype)[:, None]
    coef = coef.to(dtype)[:, None]
    values = torch.where(keep, values, 0.0)
    size = _chunk_size(n_rows, vocab, student.device)
    for start in range(0, vocab, size):
        stop = min(start + size, vocab)
        if stream:
            x = _chunk(student, start, stop, n_rows, dtype)
            g = torch.where(x == -math.inf, 0.0, coef * torch.exp(x - tail_safe))
            if label_grad is not None:
                columns = torch.arange(start, stop, device=x.device)
                g = g + torch.where(columns == labels.reshape(n_rows, 1), label_grad.to(dtype)[:, None], 0.0)
            g = torch.where(keep, g, 0.0)
        else:
            g = torch.zeros(n_rows, stop - start, dtype=dtype, device=student.device)
        # Support entries get their own gradient; the extra column takes the ids of other chunks.
        column, here = _chunk_positions(ids, start, stop)
        g = torch.cat([g, g.new_zeros(n_rows, 1)], dim=1)
        g.scatter_(1, column, torch.where(here, values.to(dtype), 0.0))
        flat[:, start:stop] = g[:, :-1]
    return out
