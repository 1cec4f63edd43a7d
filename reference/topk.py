"""Executable specification of the top-k losses: build each row's coarsened vocabulary, call the dense
reference on it.

A row of the teacher is K (id, log-probability) pairs; an entry with id < 0 or logprob -inf is padding.
The coarsened row holds the K' real ids plus, with tail=True, one tail bucket for everything else:

    student: s'_k = s[id_k],          s'_tail = logsumexp_{j not in ids} s_j
    teacher: t'_k = logprob_k,        t'_tail = log(1 - sum_k exp(logprob_k))

and the loss is the dense loss of (s', t'). An entry that is not in the row (padding, a tail whose
teacher mass is not positive, a student tail with no finite entry) is -inf, which the dense losses read
as outside the vocabulary. The gradient is autograd through this construction: the contract gradient on
s', chained to s. An id >= V makes its position NaN.

`backend` and `validate_ids` are accepted and ignored.
"""

from __future__ import annotations

import torch

from csd_kernels.contract import active_positions, check_topk_inputs, reduce_rows

from .csd import csd_loss
from .kl import kl_loss

NEG_INF = float("-inf")


def coarsen(student_logits, teacher_ids, teacher_logprobs, tail=True):
    """(s', t'): (..., K) or (..., K + 1) coarsened rows, float32 (float64 for float64 students)."""
    vocab = student_logits.shape[-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.to(dtype)
    ids = teacher_ids.to(torch.int64)
    logprobs = teacher_logprobs.to(torch.float64)
    real = (ids >= 0) & (logprobs != NEG_INF)
    in_range = ids < vocab
    s_support = s.gather(-1, torch.where(real & in_range, ids, 0))
    s_support = torch.where(real, torch.where(in_range, s_support, float("nan")), NEG_INF)
    t_support = torch.where(real, logprobs, NEG_INF).to(dtype)
    if not tail:
        return s_support, t_support
    # (..., K, V): which vocabulary entries each real id names; tiny inputs only.
    in_support = ((torch.arange(vocab, device=s.device) == ids[..., None]) & real[..., None]).any(-2)
    rest = torch.where(in_support, NEG_INF, s)
    nonempty = (rest != NEG_INF).any(-1)
    # The inner `where` keeps the gradient finite for rows whose tail is empty.
    s_tail = torch.where(nonempty, torch.logsumexp(torch.where(nonempty[..., None], rest, 0.0), -1), NEG_INF)
    mass = 1.0 - torch.where(real, logprobs, NEG_INF).exp().sum(-1)  # in float64
    t_tail = torch.where(mass > 0, mass.clamp_min(1e-300).log(), NEG_INF).to(dtype)
    return torch.cat([s_support, s_tail[..., None]], -1), torch.cat([t_support, t_tail[..., None]], -1)


def cross_entropy_rows(student_logits, labels, active):
    """Per-position hard-label cross-entropy over every finite student entry, 0 where not counted."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
    labels = labels.reshape(-1).to(torch.int64)
    vocab = s.shape[-1]
    in_range = (labels >= 0) & (labels < vocab)
    picked = s.gather(-1, torch.where(in_range, labels, 0)[:, None])[:, 0]
    ce = torch.logsumexp(s, -1) - torch.where(in_range, picked, float("nan"))
    return torch.where(active, ce, 0.0)


def topk_csd_loss(student_logits, teacher_ids, teacher_logprobs, *, tail=True, weighting="ss",
                  temperature=1.0, teacher_temperature=1.0, labels=None, ignore_index=-100, mask=None,
                  reduction="mean", num_items_in_batch=None, backend=None, ce_weight=0.0, csd_weight=1.0,
                  return_components=False, validate_ids=False):
    check_topk_inputs(student_logits, teacher_ids, teacher_logprobs)
    s, t = coarsen(student_logits, teacher_ids, teacher_logprobs, tail)
    csd = csd_loss(s, t, weighting=weighting, temperature=temperature,
                   teacher_temperature=teacher_temperature, labels=labels, ignore_index=ignore_index,
                   mask=mask, reduction="none", num_items_in_batch=num_items_in_batch).reshape(-1)
    lead = student_logits.shape[:-1]
    active = active_positions(lead, student_logits.device, labels, mask, ignore_index)
    ce = cross_entropy_rows(student_logits, labels, active) if ce_weight else torch.zeros_like(csd)
    parts = [csd_weight * csd + ce_weight * ce, csd.detach(), ce.detach()]
    parts = [reduce_rows(x, active, lead, reduction, num_items_in_batch) for x in parts]
    return tuple(parts) if return_components else parts[0]


def topk_kl_loss(student_logits, teacher_ids, teacher_logprobs, *, kind="forward", tail=True,
                 temperature=1.0, labels=None, ignore_index=-100, mask=None, reduction="mean",
                 num_items_in_batch=None, backend=None):
    check_topk_inputs(student_logits, teacher_ids, teacher_logprobs)
    s, t = coarsen(student_logits, teacher_ids, teacher_logprobs, tail)
    return kl_loss(s, t, kind=kind, temperature=temperature, labels=labels, ignore_index=ignore_index,
                   mask=mask, reduction=reduction, num_items_in_batch=num_items_in_batch)


def teacher_topk(teacher_logits, k, *, temperature=1.0):
    """(ids int64, logprobs float32): the top k of log_softmax(teacher_logits / temperature)."""
    logprobs = torch.log_softmax(teacher_logits.to(torch.float32) / temperature, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values
