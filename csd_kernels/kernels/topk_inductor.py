"""The compiled CPU backend ("inductor") of the top-k losses' student pass: the tail's log-sum-exp and the
gradient on the full row, over whole rows, compiled by Inductor's C++ code generation.

What it computes is `topk_torch.py`'s (the semantics) and `topk_triton.py`'s method (the maths): the
tail without a membership test, by summing every term and subtracting the support's,

    m = max_j s_j,   Z = sum_j exp(s_j - m),   s'_tail = m + log(Z - sum_k exp(s[id_k] - m))

each term rounded to fp32 by one expression and accumulated in fp64, in the same compiled call for the
row and for the gathered support, so that the support's terms are bitwise the row's and the
subtraction removes them exactly (what remains: fp64 summation error, about V * 2^-53 * Z). With the
row's own maximum no term overflows. Rows where that is not enough take `topk_torch`'s exact pass
(those rows only): under 2^-24 of the mass off the support (the subtraction could lose digits), an
empty tail (K = V, or every off-support entry -inf), or a NaN anywhere in the row (the chunked pass
keeps a NaN on the support out of the tail, as the contract says).

The backward writes coef * exp(s_j - s'_tail) (plus the cross-entropy's label term) in one compiled
pass, in the logits' dtype (into a gradient on transparent huge pages, as the dense losses'), then the
support entries get their own gradients (an O(N K) scatter).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import topk_torch
from .inductor_backend import _compiled, _new_gradient, _rows
from .torch_backend import LOG2E, _compute_dtype

CANCEL = 2.0**-24  # the least tail mass, as a fraction of Z, that the subtraction resolves


def _safe(m):  # a row without any valid entry keeps m = -inf; exponents are then taken around 0
    return torch.where(m == -math.inf, 0.0, m)


def _sums_impl(student, ids):
    """(m (N, 1), Z (N, 1), the support's part of Z (N, 1)), Z's in float64; `ids` (N, K) int64
    clamped into [0, V), `student` (N, V)."""
    s = student.to(_compute_dtype(student))
    m = s.amax(-1, keepdim=True)
    shift = _safe(m)
    total = torch.exp2((s - shift) * LOG2E).to(torch.float64).sum(-1, keepdim=True)
    on_support = torch.exp2((s.gather(-1, ids) - shift) * LOG2E).to(torch.float64)
    return m, total, on_support


def _gradient_impl(student, tail, coef, active, labels, label_grad, out):
    """coef * exp(s_j - tail) (0 where s_j = -inf), plus label_grad at the label, 0 in rows not
    `active`, into `out`."""
    s = student.to(coef.dtype)
    g = torch.where(s == -math.inf, 0.0, coef * torch.exp(s - tail))
    if labels is not None:
        columns = torch.arange(s.shape[-1], device=s.device)
        g = g + torch.where(columns == labels, label_grad, 0.0)
    out.copy_(torch.where(active, g, 0.0))
    return out


_sums = _compiled(_sums_impl)
_gradient = _compiled(_gradient_impl)


def student_pass(student: torch.Tensor, ids: torch.Tensor, active: torch.Tensor,
                 stream: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """As `topk_torch.student_pass`: (support (N, K), tail (N,)) in the compute dtype."""
    n_rows = ids.shape[0]
    rows = _rows(student, n_rows)
    if not stream or n_rows == 0 or rows is None:  # no pass over the row, or a layout only a copy makes rows of
        return topk_torch.student_pass(student, ids, active, stream)
    dtype = _compute_dtype(student)
    support = topk_torch.support_logits(student, ids, dtype)
    wide = ids.long()
    valid_id = (wide >= 0) & (wide < student.shape[-1])
    m, total, on_support = _sums(rows, torch.where(valid_id, wide, 0).contiguous())
    rest = total[:, 0] - torch.where(valid_id, on_support, 0.0).sum(-1)
    tail = (_safe(m)[:, 0].double() + torch.log(rest)).to(dtype)
    exact = ~torch.isfinite(total[:, 0]) | (rest <= CANCEL * total[:, 0]) | torch.isnan(support).any(-1)
    redo = exact.nonzero().squeeze(1)  # CPU tensors: no device to synchronise with
    if redo.numel():
        _, tail_exact = topk_torch.student_pass(rows[redo], ids[redo], active[redo], stream)
        tail = tail.index_put((redo,), tail_exact)
    return support, tail


def student_backward(student: torch.Tensor, ids: torch.Tensor, active: torch.Tensor,
                     labels: Optional[torch.Tensor], tail: torch.Tensor, coef: torch.Tensor,
                     values: torch.Tensor, label_grad: Optional[torch.Tensor], stream: bool) -> torch.Tensor:
    """As `topk_torch.student_backward`: the gradient on the full row, in the student's shape and dtype."""
    n_rows, vocab = ids.shape[0], student.shape[-1]
    rows = _rows(student, n_rows)
    if not stream or n_rows == 0 or rows is None:
        return topk_torch.student_backward(student, ids, active, labels, tail, coef, values, label_grad, stream)
    dtype = _compute_dtype(student)
    out = _new_gradient(student)  # on huge pages from 2 MB on, as the dense losses' (inductor_backend.py)
    keep = active[:, None]
    tail_safe = torch.where(tail == -math.inf, 0.0, tail).to(dtype)[:, None].contiguous()
    if label_grad is not None:
        label_grad = label_grad.to(dtype)[:, None].contiguous()
        labels = labels.reshape(n_rows, 1).long().contiguous()
    _gradient(rows, tail_safe, coef.to(dtype)[:, None].contiguous(), keep.contiguous(),
              labels if label_grad is not None else None, label_grad, _rows(out, n_rows))
    # The support entries get their own gradients (0 in rows not active); padding (-1) writes nothing.
    wide = ids.long()
    row, col = ((wide >= 0) & (wide < vocab)).nonzero(as_tuple=True)
    flat = out.view(n_rows, vocab)
    flat[row, wide[row, col]] = torch.where(keep, values, 0.0)[row, col].to(out.dtype)
    return out
