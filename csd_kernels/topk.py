"""Top-k teachers: CSD and KL from cached or served top-k log-probabilities, and `teacher_topk`.

A teacher row is K (id, log-probability) pairs, the log-probabilities over the teacher's full
vocabulary; an entry with id < 0 or logprob -inf is padding. Each row is reduced to a coarsened
vocabulary, its K' real ids plus (tail=True) one tail bucket for everything else:

    student: s'_k = s[id_k],      s'_tail = logsumexp_{j not in ids} s_j
    teacher: t'_k = logprob_k,    t'_tail = log(1 - sum_k exp(logprob_k))   (left out if that mass <= 0)

and the loss is exactly `csd_loss(s', t', ...)` (`kl_loss` for `topk_kl_loss`). CSD needs no
normaliser here: it depends on logit differences only, so log-probabilities are as good as logits, and
the tail bucket carries the student's mass off the teacher's support (its gradient pushes that mass
down). With tail=False the row is the support alone, and raw teacher logits work as well as
log-probabilities (any per-row constant cancels).

Only two passes touch the student's (N, V) logits (kernels/topk_triton.py): the forward reads them once
for the tail's log-sum-exp, the backward reads them and writes the gradient, 6 bytes per element in
bf16 against dense CSD's 10; the teacher costs O(N x K). The losses proper run the dense kernels on the
(N, K' + 1) coarsened rows.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .contract import (
    _check_logits,
    _check_positions,
    _check_temperature,
    active_positions,
    check_flag,
    check_k,
    check_labels_in_range,
    check_loss_weight,
    check_options,
    check_topk_ids,
    check_topk_inputs,
    kl_spec,
    parse_weighting,
    reduce_rows,
    row_labels,
)
from .loss import csd_loss, kl_loss
from .ops import resolve_backend, topk_student

NEG_INF = -math.inf


def _coarsened_rows(student_logits, teacher_ids, teacher_logprobs, tail, labels, ignore_index, mask,
                    backend, ce):
    """(s', t' (N, K or K + 1), active (N,), cross-entropy rows (N,) or None, resolved backend)."""
    lead = student_logits.shape[:-1]
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    n_rows = math.prod(lead)
    backend = resolve_backend(backend, student_logits, student_logits, family="topk")
    active = active_positions(lead, student_logits.device, labels, mask, ignore_index)
    ids = teacher_ids.reshape(n_rows, k).to(torch.int64)  # any integer dtype (uint8 cannot hold V)
    logprobs = teacher_logprobs.reshape(n_rows, k)
    real = (ids >= 0) & (logprobs != NEG_INF)
    # int32 for the kernels, -1 outside the support; an id >= V stays >= V (that position is NaN).
    kernel_ids = torch.where(real, ids.clamp(max=vocab), -1).to(torch.int32).contiguous()
    support, s_tail, lse, label_logit = topk_student(
        student_logits, kernel_ids, active, row_labels(labels) if ce else None, tail or ce, backend)
    dtype = support.dtype
    t_support = torch.where(real, logprobs.to(dtype), NEG_INF)
    if tail:
        mass = 1.0 - torch.where(real, logprobs.to(torch.float64), NEG_INF).exp().sum(-1)  # float64
        t_tail = torch.where(mass > 0, mass.clamp_min(1e-300).log(), NEG_INF).to(dtype)
        s_rows = torch.cat([support, s_tail[:, None]], dim=1)
        t_rows = torch.cat([t_support, t_tail[:, None]], dim=1)
    else:
        s_rows, t_rows = support, t_support
    ce_rows = torch.where(active, lse - label_logit, 0.0) if ce else None
    if backend == "inductor":  # the coarsened rows are short: the dense backend "auto" picks for their size
        backend = resolve_backend("auto", s_rows, t_rows)
    return s_rows.view(*lead, -1), t_rows.view(*lead, -1), active, ce_rows, backend


def _check_common(student_logits, teacher_ids, teacher_logprobs, tail, labels, mask, validate_ids):
    check_topk_inputs(student_logits, teacher_ids, teacher_logprobs)
    check_flag("tail", tail)
    check_flag("validate_ids", validate_ids)
    lead = student_logits.shape[:-1]
    for name, x, want_bool in (("labels", labels, False), ("mask", mask, True)):
        if x is not None:
            _check_positions(name, x, lead, student_logits.device, want_bool)
    if validate_ids:
        check_topk_ids(teacher_ids, teacher_logprobs, student_logits.shape[-1])


def topk_csd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    tail: bool = True,
    weighting="ss",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch: Union[None, int, torch.Tensor] = None,
    backend: str = "auto",
    ce_weight: float = 0.0,
    csd_weight: float = 1.0,
    return_components: bool = False,
    validate_ids: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """CSD against a top-k teacher: `csd_loss` on each row's coarsened vocabulary (module docstring).

    Args:
        student_logits: (..., V) float32, bfloat16, float16 or float64, any strides, as in `csd_loss`.
        teacher_ids: (..., K) any integer dtype (int32 is the cache format): the teacher's top ids, -1
            (any negative id) for padding. Rows may have fewer than K real entries.
        teacher_logprobs: (..., K) float: the teacher's log-probabilities over its full vocabulary at
            those ids (-inf for padding). With tail=False, raw teacher logits work too.
        tail: add the tail bucket (the rest of the vocabulary) to each row; False: the support alone.
        weighting, temperature, teacher_temperature, labels, ignore_index, mask, reduction,
        num_items_in_batch, backend, csd_weight, return_components: as in `csd_loss`, on the coarsened
            rows (S = softmax(s' / temperature), T = softmax(t' / teacher_temperature), U uniform over
            the coarsened row).
        ce_weight: add the hard-label cross-entropy over the student's full vocabulary (same pass).
        validate_ids: check on the host that every real id is < V and no row repeats one (a device sync).
            Unchecked, an id >= V makes its position NaN and duplicate ids are undefined.

    Returns:
        float32 scalar (float64 for float64 students), per-position values for reduction="none", or
        (total, csd, ce) with return_components. The gradient (student's dtype) is the contract
        gradient on s', chained to s: off the support, g'_tail * exp(s_j - s'_tail).
    """
    _check_common(student_logits, teacher_ids, teacher_logprobs, tail, labels, mask, validate_ids)
    check_options(temperature=temperature, teacher_temperature=teacher_temperature, ignore_index=ignore_index,
                  reduction=reduction, backend=backend, num_items_in_batch=num_items_in_batch,
                  device=student_logits.device)
    parse_weighting(weighting)
    ce_weight = check_loss_weight("ce_weight", ce_weight)
    csd_weight = check_loss_weight("csd_weight", csd_weight)
    check_flag("return_components", return_components)
    if ce_weight > 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} needs `labels` (the targets of the cross-entropy)")
    if validate_ids and labels is not None and ce_weight > 0:
        check_labels_in_range(labels, student_logits.shape[-1], ignore_index, mask)
    lead = student_logits.shape[:-1]
    s_rows, t_rows, active, ce_rows, backend = _coarsened_rows(
        student_logits, teacher_ids, teacher_logprobs, tail, labels, ignore_index, mask, backend,
        ce_weight > 0)
    csd = csd_loss(s_rows, t_rows, weighting=weighting, temperature=temperature,
                   teacher_temperature=teacher_temperature, mask=active.view(lead), reduction="none",
                   backend=backend).reshape(-1)
    total = csd if csd_weight == 1.0 else csd_weight * csd
    if ce_rows is not None:
        total = total + ce_weight * ce_rows.to(total.dtype)
    loss = reduce_rows(total, active, lead, reduction, num_items_in_batch)
    if not return_components:
        return loss
    ce = ce_rows.to(csd.dtype) if ce_rows is not None else torch.zeros_like(csd)
    return (loss,) + tuple(reduce_rows(x.detach(), active, lead, reduction, num_items_in_batch) for x in (csd, ce))


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: str = "forward",
    tail: bool = True,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch: Union[None, int, torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KL against a top-k teacher: `kl_loss(s', t', kind=kind, temperature=temperature)` on each row's
    coarsened vocabulary (module docstring); arguments as in `topk_csd_loss` and `kl_loss`.

    With tail=True both sides are distributions over the same K' + 1 buckets, each normalised over the
    full vocabulary, so this is the exact KL between the coarsened teacher and student (a lower bound
    of the full-vocabulary KL). With tail=False both are renormalised over the support."""
    _check_common(student_logits, teacher_ids, teacher_logprobs, tail, labels, mask, False)
    check_options(temperature=temperature, ignore_index=ignore_index, reduction=reduction, backend=backend,
                  num_items_in_batch=num_items_in_batch, device=student_logits.device)
    kl_spec(kind, 1.0)
    lead = student_logits.shape[:-1]
    s_rows, t_rows, active, _, backend = _coarsened_rows(
        student_logits, teacher_ids, teacher_logprobs, tail, labels, ignore_index, mask, backend, False)
    return kl_loss(s_rows, t_rows, kind=kind, temperature=temperature, mask=active.view(lead),
                   reduction=reduction, num_items_in_batch=num_items_in_batch, backend=backend)


# Rows of teacher logits upcast to fp32 at a time by `teacher_topk` (the only full-width temporary).
_TOPK_CHUNK_ELEMENTS = 1 << 24


def teacher_topk(teacher_logits: torch.Tensor, k: int, *,
                 temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A top-k cache row from dense teacher logits: the k largest of log_softmax(teacher_logits /
    temperature) and their ids.

    Args:
        teacher_logits: (..., V) float tensor, any strides.
        k: 1 <= k <= V.
        temperature: the temperature of the cached log-probabilities (1 for the usual cache).
    Returns:
        (ids (..., k) int64, logprobs (..., k) float32), in descending order of logprob. Store ids as
        int32 and logprobs as float32 or float16 (README: what bf16 storage costs).

    Works through the rows in chunks of about 2^24 elements, so no fp32 copy of the whole (N, V) tensor
    is made. No gradient flows (a cache is data).
    """
    _check_logits("teacher_logits", teacher_logits)
    vocab = teacher_logits.shape[-1]
    k = check_k(k, vocab)
    temperature = _check_temperature("temperature", temperature)
    lead = teacher_logits.shape[:-1]
    rows = teacher_logits.detach().reshape(-1, vocab)
    n_rows = rows.shape[0]
    ids = torch.empty(n_rows, k, dtype=torch.int64, device=rows.device)
    logprobs = torch.empty(n_rows, k, dtype=torch.float32, device=rows.device)
    step = max(1, _TOPK_CHUNK_ELEMENTS // vocab)
    for start in range(0, n_rows, step):
        chunk = rows[start:start + step].to(torch.float32)
        if temperature != 1.0:
            chunk = chunk / temperature
        values, index = torch.log_softmax(chunk, dim=-1).topk(k, dim=-1)
        ids[start:start + step], logprobs[start:start + step] = index, values
    return ids.view(*lead, k), logprobs.view(*lead, k)
