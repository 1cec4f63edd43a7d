"""Public API: `csd_loss` and the `CSDLoss` module."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .autograd import CSDFunction, resolve_backend
from .contract import CSDSpec, active_positions, check_inputs, parse_weighting, reduce_rows


def csd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    weighting="ss",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch: Union[None, int, torch.Tensor] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Concrete Score Distillation loss between student and teacher logits.

    For each position, with d = s - t (fp32) over the student's V_s entries and weights (w1, w2)::

        loss = 1/4 * sum_x sum_y w1(x) w2(y) (d_x - d_y)^2
             = 1/4 * (Var_w1(d) + Var_w2(d) + (E_w1[d] - E_w2[d])^2)

    The weights are constants (no gradient flows through them); the gradient w.r.t. the student is
    1/2 (w2(k) (d_k - E_w1[d]) + w1(k) (d_k - E_w2[d])), the gradient of the authors' training code.

    Args:
        student_logits: (..., V_s) float32, bfloat16, float16 or float64, any strides.
        teacher_logits: (..., V_t) with the same leading dims and V_t >= V_s; only the first V_s columns
            are read (padded teacher vocabularies need no copy). Receives no gradient.
        weighting: "ss" (default, mode-seeking), "ts"/"st" (mode-covering), "us", "tt", "uu", or a
            tuple (w1, w2) of "student", "teacher", "uniform" or dicts of those names to non-negative
            coefficients summing to 1, e.g. ({"teacher": .15, "student": .85},) * 2.
        temperature: softens the student weights S = softmax(s / temperature); d is never scaled.
        teacher_temperature: softens the teacher weights T = softmax(t / teacher_temperature).
        labels: integer (...,); positions equal to `ignore_index` are excluded.
        mask: bool (...,); False positions are excluded (combined with `labels` by AND if both given).
        reduction: "mean" over counted positions, "sum", or "none" (per-position, 0 where excluded).
        num_items_in_batch: int or one-element tensor replacing the denominator of "mean" (gradient
            accumulation, multi-GPU token averaging); not clamped, so it must be > 0.
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "torch" or "triton".
        inplace_backward: write the gradient into `student_logits`' storage instead of a new (N, V)
            buffer. Unsafe when anything else still needs the logits (another loss on the same logits,
            a later read of them): their version counter is bumped, so autograd raises if a saved
            copy is used afterwards, but a plain later read sees the gradient.

    Entries where the student or teacher logit is -inf lie outside that row's vocabulary (zero weight,
    zero gradient, U counts only the rest). NaN in a counted position propagates to the loss. Excluded
    positions are never read. An empty batch or all positions excluded gives exactly 0.

    Returns:
        float32 scalar, or per-position (...,) losses for reduction="none" (float64 when an input is
        float64, which the PyTorch backend computes in float64). The gradient has the student's dtype.
    """
    temperature, teacher_temperature = check_inputs(
        student_logits,
        teacher_logits,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
    )
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    w1, w2 = parse_weighting(weighting)
    spec = CSDSpec(w1, w2, temperature, teacher_temperature)
    backend = resolve_backend(backend, student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    active = active_positions(lead, student_logits.device, labels, mask, ignore_index)
    row_loss = CSDFunction.apply(student_logits, teacher_logits, active, spec, backend, inplace_backward)
    return reduce_rows(row_loss, active, lead, reduction, num_items_in_batch)


class CSDLoss(torch.nn.Module):
    """`csd_loss` as a module: the keyword arguments are fixed at construction.

    `labels`, `mask` and `num_items_in_batch` may also be given per call to `forward`.
    """

    def __init__(self, **kwargs):
        super().__init__()
        unknown = set(kwargs) - _KEYWORDS
        if unknown:
            raise TypeError(f"CSDLoss got unknown keyword argument(s) {sorted(unknown)}")
        # Validate the fixed arguments now rather than at the first training step.
        parse_weighting(kwargs.get("weighting", "ss"))
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, **call_kwargs):
        return csd_loss(student_logits, teacher_logits, **{**self.kwargs, **call_kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


_KEYWORDS = {
    "weighting", "temperature", "teacher_temperature", "labels", "ignore_index", "mask",
    "reduction", "num_items_in_batch", "backend", "inplace_backward",
}
