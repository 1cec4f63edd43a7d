"""Executable specification of CSD: plain PyTorch that materialises everything.

Read this before the kernels. Three implementations with the public signature of `csd_loss`:

- `csd_loss`: the closed form 1/4 (Var_w1(d) + Var_w2(d) + (E_w1[d] - E_w2[d])^2), with two-pass
  (centred) variances; autograd through it, with the weights detached, gives the contract's gradient.
- `csd_loss_pairwise`: the definition itself, 1/4 sum_x sum_y w1(x) w2(y) (d_x - d_y)^2, O(V^2) memory:
  tiny V only.
- `csd_loss_authors`: a surrogate in the style of the authors' training code, (g.detach() * s).sum()
  with g the per-entry gradient: the same gradient, a meaningless value, and the memory cost of a
  naive implementation (several fp32 N x V tensors). The benchmarks time it as "the authors' cost".

`backend` and `inplace_backward` are accepted and ignored so that tests and benchmarks can swap these in
for `csd_kernels.csd_loss` by name.
"""

from __future__ import annotations

import torch

from csd_kernels.contract import (
    active_positions,
    check_inputs,
    parse_weighting,
    reduce_rows,
)


def _prepare(student_logits, teacher_logits, temperature, teacher_temperature, labels, ignore_index,
             mask, reduction, num_items_in_batch):
    check_inputs(
        student_logits, teacher_logits, temperature=temperature,
        teacher_temperature=teacher_temperature, labels=labels, ignore_index=ignore_index, mask=mask,
        reduction=reduction, num_items_in_batch=num_items_in_batch,
    )
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    s = student_logits.reshape(-1, vocab).to(dtype)
    t = teacher_logits[..., :vocab].reshape(-1, vocab).to(dtype)
    active = active_positions(lead, student_logits.device, labels, mask, ignore_index)
    return s, t, active, lead


def base_distributions(s, t, temperature, teacher_temperature):
    """(valid, S, T, U), each (N, V), all detached. Entries with s or t = -inf are not in the row."""
    valid = (s != float("-inf")) & (t != float("-inf"))
    nonempty = valid.any(dim=-1, keepdim=True)

    def softmax_over_valid(x):
        probs = torch.softmax(torch.where(valid, x, float("-inf")), dim=-1)
        return torch.where(nonempty, probs, 0.0)  # softmax of an all -inf row is NaN: no entries

    S = softmax_over_valid(s.detach() / temperature)
    T = softmax_over_valid(t.detach() / teacher_temperature)
    U = valid.to(s.dtype) / valid.sum(dim=-1, keepdim=True).clamp_min(1)
    return valid, S, T, U


def mixture_weights(weighting, S, T, U):
    """(w1, w2) as (N, V) tensors."""
    return tuple(a_s * S + a_t * T + a_u * U for a_s, a_t, a_u in parse_weighting(weighting))


def _weights_and_d(s, t, weighting, temperature, teacher_temperature):
    valid, S, T, U = base_distributions(s, t, temperature, teacher_temperature)
    w1, w2 = mixture_weights(weighting, S, T, U)
    d = torch.where(valid, s - t, 0.0)  # masked entries: no weight, and no gradient through `where`
    return d, w1, w2


def csd_loss(student_logits, teacher_logits, *, weighting="ss", temperature=1.0,
             teacher_temperature=1.0, labels=None, ignore_index=-100, mask=None, reduction="mean",
             num_items_in_batch=None, backend=None, inplace_backward=False):
    s, t, active, lead = _prepare(student_logits, teacher_logits, temperature, teacher_temperature,
                                  labels, ignore_index, mask, reduction, num_items_in_batch)
    d, w1, w2 = _weights_and_d(s, t, weighting, temperature, teacher_temperature)
    e1 = (w1 * d).sum(-1, keepdim=True)
    e2 = (w2 * d).sum(-1, keepdim=True)
    var1 = (w1 * (d - e1) ** 2).sum(-1)
    var2 = (w2 * (d - e2) ** 2).sum(-1)
    row_loss = 0.25 * (var1 + var2 + (e1 - e2).squeeze(-1) ** 2)
    row_loss = torch.where(active, row_loss, 0.0)
    return reduce_rows(row_loss, active, lead, reduction, num_items_in_batch)


def csd_loss_pairwise(student_logits, teacher_logits, *, weighting="ss", temperature=1.0,
                      teacher_temperature=1.0, labels=None, ignore_index=-100, mask=None,
                      reduction="mean", num_items_in_batch=None, backend=None, inplace_backward=False):
    s, t, active, lead = _prepare(student_logits, teacher_logits, temperature, teacher_temperature,
                                  labels, ignore_index, mask, reduction, num_items_in_batch)
    d, w1, w2 = _weights_and_d(s, t, weighting, temperature, teacher_temperature)
    pair_weights = w1[:, :, None] * w2[:, None, :]  # (N, x, y)
    differences = d[:, :, None] - d[:, None, :]
    row_loss = 0.25 * (pair_weights * differences**2).sum(dim=(1, 2))
    row_loss = torch.where(active, row_loss, 0.0)
    return reduce_rows(row_loss, active, lead, reduction, num_items_in_batch)


def csd_loss_authors(student_logits, teacher_logits, *, weighting="ss", temperature=1.0,
                     teacher_temperature=1.0, labels=None, ignore_index=-100, mask=None,
                     reduction="mean", num_items_in_batch=None, backend=None, inplace_backward=False):
    s, t, active, lead = _prepare(student_logits, teacher_logits, temperature, teacher_temperature,
                                  labels, ignore_index, mask, reduction, num_items_in_batch)
    d, w1, w2 = _weights_and_d(s, t, weighting, temperature, teacher_temperature)
    e1 = (w1 * d).sum(-1, keepdim=True)
    e2 = (w2 * d).sum(-1, keepdim=True)
    grad = 0.5 * (w2 * (d - e1) + w1 * (d - e2))
    row_surrogate = (grad.detach() * torch.where(grad != 0, s, 0.0)).sum(-1)
    row_surrogate = torch.where(active, row_surrogate, 0.0)
    return reduce_rows(row_surrogate, active, lead, reduction, num_items_in_batch)
