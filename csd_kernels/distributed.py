"""Vocabulary-parallel CSD and KL over torch.distributed (Megatron-style tensor-parallel output layers).

Each rank holds a contiguous slice of the vocabulary of both models' logits. The row statistics of
`kernels/stats.py` are maxima, totals and centred moments, so they combine across ranks exactly:

1. each rank streams its slice once and keeps the partial statistics of every row (N x 16 floats);
2. one all-gather gives every rank all the ranks' partials (N x world x 16 floats);
3. every rank merges them with Chan's parallel update (the same `finalize` that merges a split row's
   programs, so a shard whose entries are all -inf, or whose d sits far from the others', is merged
   without cancellation), finalises the rows identically, and its backward, with no collective at
   all, writes the slice of the full gradient that belongs to its slice of the logits.

So: one collective per forward, none in the backward, O(N x world) fp32 on the wire (fp64 for float64
inputs), no host synchronisation. The fused cross-entropy adds its log-sum-exp and the label's logit
(which lives on one rank) to the same partials; only locating a shard's first column, when the caller
does not pass `vocab_start`, takes a second collective (an all-gather of the shard widths).

Composition. With data parallelism too, call this inside the tensor-parallel group (`group`): the loss
is then the loss of this data-parallel rank's batch, and gradients average over the data-parallel group
as usual. To average over *tokens* across data-parallel ranks instead (as transformers' Trainer does),
pass `num_items_in_batch` = the global number of counted tokens (an all-reduced count, the same on every
rank of the tensor-parallel group) with reduction="mean".
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from .contract import (
    LossSpec,
    active_positions,
    check_inputs,
    check_loss_weight,
    kl_spec,
    parse_weighting,
    reduce_rows,
    row_labels,
)
from .kernels import stats as st
from .ops import backend_module, resolve_backend

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634

_KEYWORDS = {"temperature", "labels", "ignore_index", "mask", "reduction", "num_items_in_batch", "backend"}


def _check_group(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocabulary-parallel losses need an initialised torch.distributed process group")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of `group`")


def _check_consistency(student, group) -> None:
    """Opt-in: compare the leading shape across ranks (one small all-gather and a host sync)."""
    shape = torch.tensor(list(student.shape[:-1]) + [student.dim()], dtype=torch.int64, device=student.device)
    size = torch.tensor([shape.numel()], device=student.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"shards have different numbers of leading dims across ranks: {[int(s) - 1 for s in sizes]}")
    shapes = [torch.zeros_like(shape) for _ in sizes]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError("shards have different leading shapes across ranks: "
                         f"{[tuple(s[:-1].tolist()) for s in shapes]}")


def gather_partials(parts: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's partial row statistics (N, PARTIAL), stacked in rank order: (N, world, PARTIAL).

    One all-gather. The backends' `finalize` merges them with Chan's parallel update, exactly as it
    merges a split row's programs, so every rank finalises identically and deterministically."""
    shards = [torch.empty_like(parts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, parts.contiguous(), group=group)
    return torch.stack(shards, dim=1)


def _merge_cross_entropy(gathered: torch.Tensor):
    """(max, log2 Z) of the full-row cross-entropy softmax and (s[label], found) from the gathered
    partials: O(N x world) work."""
    maxima = gathered[..., st.P_CE]
    m = maxima.amax(-1)
    z = (gathered[..., st.P_CE + 1] * torch.exp2((maxima - torch.where(m == -math.inf, 0.0, m)[:, None])
                                                 * LOG2E)).sum(-1)
    label_logit, owners = gathered[..., st.P_LABEL].sum(-1), gathered[..., st.P_LABEL + 1].sum(-1)
    return m, torch.log2(z), label_logit, owners > 0


class VocabParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, active, labels, spec: LossSpec, backend: str, group, vocab_start):
        kernels = backend_module(backend)
        n_rows = active.numel()
        parts = kernels.partials(student, teacher, active, None, spec).reshape(n_rows, st.PARTIAL)
        local = None
        if spec.has_ce:
            # The label's logit lives on one rank: it rides in the partials' label columns.
            local = labels - vocab_start
            owned = (local >= 0) & (local < student.shape[-1])
            index = torch.where(owned, local, 0).view(*student.shape[:-1], 1)
            picked = student.gather(-1, index).reshape(n_rows).to(parts.dtype)
            parts[:, st.P_LABEL] = torch.where(owned, picked, 0.0)
            parts[:, st.P_LABEL + 1] = owned.to(parts.dtype)
        gathered = gather_partials(parts, group)
        # CSD from the kernels; the cross-entropy of the gathered statistics here (O(N) work).
        total, _, stats = kernels.finalize(gathered, student, active, None, replace(spec, ce_weight=0.0))
        label_found = None
        if spec.has_ce:
            m_1, log2z_1, label_logit, label_found = _merge_cross_entropy(gathered)
            # no rank owns the label: out of range, NaN as in csd_loss
            ce = torch.where(label_found, (m_1 - label_logit) + log2z_1 * LN2, math.nan)
            total = total + spec.ce_weight * torch.where(active, ce, 0.0).to(total.dtype)
            stats[:, st.M_1] = m_1.to(stats.dtype)
            stats[:, st.LOG2Z_1] = log2z_1.to(stats.dtype)
        ctx.save_for_backward(student, teacher, active, local, label_found, stats)
        ctx.spec, ctx.backend = spec, backend
        return total

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, active, local, label_found, stats = ctx.saved_tensors
        if ctx.spec.has_ce:  # a NaN loss (label out of range) gets a NaN gradient, as in csd_loss
            grad_rows = torch.where(label_found | ~active, grad_rows, math.nan)
        grad = backend_module(ctx.backend).backward(student, teacher, active, local, stats, grad_rows,
                                                    ctx.spec, sharded_labels=True)
        return grad, None, None, None, None, None, None, None


def _vocab_start(width: int, group, device) -> torch.Tensor:
    """This rank's first column: the widths of the lower ranks' shards, summed (one all-gather)."""
    mine = torch.tensor([width], dtype=torch.int64, device=device)
    widths = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, mine, group=group)
    return torch.cat(widths)[: dist.get_rank(group)].sum()


def _vocab_parallel(student, teacher, spec_of, group, check_consistency, kw, allowed=(), vocab_start=None):
    unknown = set(kw) - _KEYWORDS - set(allowed)
    if unknown:
        raise TypeError(f"unsupported keyword argument(s) {sorted(unknown)}")
    _check_group(group)
    temperature, teacher_temperature = check_inputs(
        student, teacher, temperature=kw.get("temperature", 1.0),
        teacher_temperature=kw.get("teacher_temperature", 1.0), labels=kw.get("labels"),
        ignore_index=kw.get("ignore_index", -100), mask=kw.get("mask"),
        reduction=kw.get("reduction", "mean"), num_items_in_batch=kw.get("num_items_in_batch"),
        backend=kw.get("backend", "auto"))
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(f"the teacher shard must cover the student shard's columns exactly, got widths "
                         f"{teacher.shape[-1]} and {student.shape[-1]}")
    if check_consistency:
        _check_consistency(student, group)
    spec = spec_of(temperature, teacher_temperature)
    labels = kw.get("labels")
    if spec.has_ce:
        if labels is None:
            raise ValueError(f"ce_weight={spec.ce_weight} needs `labels` (the targets of the cross-entropy)")
        if vocab_start is None:
            vocab_start = _vocab_start(student.shape[-1], group, student.device)
        elif isinstance(vocab_start, bool) or not isinstance(vocab_start, (int, torch.Tensor)):
            raise TypeError(f"vocab_start must be an int or a tensor, got {type(vocab_start).__name__}")
    backend = resolve_backend(kw.get("backend", "auto"), student, teacher)
    lead = student.shape[:-1]
    active = active_positions(lead, student.device, labels, kw.get("mask"), kw.get("ignore_index", -100))
    flat_labels = row_labels(labels) if spec.has_ce else None  # any integer dtype: int64 before `- start`
    total = VocabParallelFunction.apply(student, teacher, active, flat_labels, spec, backend, group, vocab_start)
    return reduce_rows(total, active, lead, kw.get("reduction", "mean"), kw.get("num_items_in_batch"))


def vocab_parallel_csd_loss(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                            group: Optional[dist.ProcessGroup] = None, check_consistency: bool = False,
                            vocab_start=None, **csd_loss_keywords) -> torch.Tensor:
    """`csd_loss` of the full-vocabulary logits, from this rank's contiguous vocabulary slice.

    Args:
        student_logits_shard, teacher_logits_shard: (..., V_r), this rank's columns of both models'
            logits (shards may differ in width across ranks; the teacher shard must cover exactly the
            student shard's columns). Leading dims must be equal on every rank.
        group: the tensor-parallel process group (default: the world).
        check_consistency: verify on every call that all ranks pass the same leading shape (one small
            all-gather and a host sync; off by default). Without it, mismatched ranks fail or hang in
            the collective, as with any collective.
        vocab_start: the global index of this shard's first column, for the fused cross-entropy
            (labels are global token ids). Default: computed with one all-gather of the shard widths.
        **csd_loss_keywords: weighting, temperature, teacher_temperature, labels, ignore_index, mask,
            reduction, num_items_in_batch, backend, ce_weight, csd_weight, as in `csd_loss`
            (labels/mask identical on every rank).

    Collectives: one all-gather per forward of N x 16 floats per rank (plus one all-gather of the shard
    widths when `vocab_start` is not given with the cross-entropy); none in the backward. Returns the
    same loss on every rank; each rank's gradient is its slice of the full one.
    """
    kw = csd_loss_keywords
    weighting = parse_weighting(kw.get("weighting", "ss"))
    ce_weight = check_loss_weight("ce_weight", kw.get("ce_weight", 0.0))
    csd_weight = check_loss_weight("csd_weight", kw.get("csd_weight", 1.0))
    return _vocab_parallel(
        student_logits_shard, teacher_logits_shard,
        lambda tau, tau_t: LossSpec(*weighting, tau, tau_t, csd_weight=csd_weight, ce_weight=ce_weight),
        group, check_consistency, kw, allowed=("weighting", "teacher_temperature", "ce_weight", "csd_weight"),
        vocab_start=vocab_start)


def vocab_parallel_kl_loss(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                           kind: str = "forward", group: Optional[dist.ProcessGroup] = None,
                           check_consistency: bool = False, **kl_loss_keywords) -> torch.Tensor:
    """`kl_loss` of the full-vocabulary logits from this rank's slice; as `vocab_parallel_csd_loss`."""
    kl_spec(kind, 1.0)  # validates `kind`
    return _vocab_parallel(student_logits_shard, teacher_logits_shard,
                           lambda tau, _: kl_spec(kind, tau), group, check_consistency, kl_loss_keywords)
