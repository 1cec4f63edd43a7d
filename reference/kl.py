"""Executable specification of the KL-family distillation losses, in plain PyTorch.

    kind="forward":  KL(p_T || p_S) = sum_k p_T(k) (log p_T(k) - log p_S(k))
    kind="reverse":  KL(p_S || p_T) = sum_k p_S(k) (log p_S(k) - log p_T(k))

with p_S = softmax(s / temperature), p_T = softmax(t / temperature) (the same temperature on both
sides, no T^2 factor), over the row's valid entries (s and t not -inf), exactly as `csd_loss` masks.
Same signature, masking and reductions as `csd_loss`; `backend` and `inplace_backward` are ignored.
"""

from __future__ import annotations

import torch

from csd_kernels.contract import reduce_rows

from .csd import _prepare

KINDS = ("forward", "reverse")


def kl_loss(student_logits, teacher_logits, *, kind="forward", temperature=1.0, labels=None,
            ignore_index=-100, mask=None, reduction="mean", num_items_in_batch=None, backend=None,
            inplace_backward=False):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    s, t, active, lead = _prepare(student_logits, teacher_logits, temperature, 1.0, labels,
                                  ignore_index, mask, reduction, num_items_in_batch)
    valid = (s != float("-inf")) & (t != float("-inf"))
    # A row without any valid entry contributes 0 (as in csd_loss): give its softmax finite inputs so
    # that no NaN appears, in the value or in the gradient, and mask every term below.
    outside = torch.where(valid.any(dim=-1, keepdim=True), float("-inf"), 0.0)
    log_p_s = torch.log_softmax(torch.where(valid, s / temperature, outside), dim=-1)
    log_p_t = torch.log_softmax(torch.where(valid, t / temperature, outside), dim=-1)
    # Zero the log-probabilities of masked entries before subtracting them, so that -inf - -inf never
    # produces a NaN (in the value or, through `where`, in the gradient).
    safe_log_p_s = torch.where(valid, log_p_s, 0.0)
    safe_log_p_t = torch.where(valid, log_p_t, 0.0)
    if kind == "forward":
        terms = log_p_t.exp() * (safe_log_p_t - safe_log_p_s)
    else:
        terms = log_p_s.exp() * (safe_log_p_s - safe_log_p_t)
    row_loss = torch.where(active, torch.where(valid, terms, 0.0).sum(-1), 0.0)
    return reduce_rows(row_loss, active, lead, reduction, num_items_in_batch)
