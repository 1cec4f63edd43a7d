"""Public API: `csd_loss`, `kl_loss` and their modules `CSDLoss`, `KLLoss`."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .ops import apply_loss, resolve_backend
from .contract import (
    LossSpec,
    active_positions,
    check_flag,
    check_inputs,
    check_labels_in_range,
    check_options,
    check_loss_weight,
    kl_spec,
    parse_weighting,
    reduce_rows,
    row_labels,
)


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
    ce_weight: float = 0.0,
    csd_weight: float = 1.0,
    return_components: bool = False,
    validate_labels: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
        backend: "auto" (Triton for CUDA tensors; on a CPU "inductor" from 2^20 logits up where a C++
            compiler is found, "torch" otherwise), "torch" (chunked PyTorch), "triton" or "inductor"
            (the compiled CPU backend).
        inplace_backward: write the gradient into `student_logits`' storage instead of a new (N, V)
            buffer. Unsafe when anything else still needs the logits (another loss on the same logits,
            a later read of them): their version counter is bumped, so autograd raises if a saved
            copy is used afterwards, but a plain later read sees the gradient.

        ce_weight: with `labels`, add ce_weight times the usual hard-label cross-entropy of the student
            logits (temperature 1, every finite student entry, same positions, reduction and
            denominator), computed in the same pass over the logits and differentiated in the same
            backward: the result is csd_weight * CSD + ce_weight * CE.
        csd_weight: the weight of the CSD term.
        return_components: return (total, csd, ce), with `csd` and `ce` detached (for logging) and
            reduced like `total`; `ce` is 0 when ce_weight is 0.
        validate_labels: check on the host that every counted label lies in [0, V_s) and raise a
            ValueError otherwise. This synchronises with the device, so it is off by default; an
            out-of-range label then makes that position's cross-entropy (and gradient) NaN.

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
    ce_weight = check_loss_weight("ce_weight", ce_weight)
    csd_weight = check_loss_weight("csd_weight", csd_weight)
    check_flag("return_components", return_components)
    check_flag("validate_labels", validate_labels)
    if ce_weight > 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} needs `labels` (the targets of the cross-entropy)")
    if validate_labels and labels is not None:
        check_labels_in_range(labels, student_logits.shape[-1], ignore_index, mask)
    spec = LossSpec(*parse_weighting(weighting), temperature, teacher_temperature,
                    csd_weight=csd_weight, ce_weight=ce_weight)
    return _apply(spec, student_logits, teacher_logits, labels, ignore_index, mask, reduction,
                  num_items_in_batch, backend, inplace_backward, return_components)


def _apply(spec, student_logits, teacher_logits, labels, ignore_index, mask, reduction,
           num_items_in_batch, backend, inplace_backward, return_components=False):
    check_flag("inplace_backward", inplace_backward)
    if inplace_backward and any(stride == 0 and size > 1
                                for stride, size in zip(student_logits.stride(), student_logits.shape)):
        raise ValueError("inplace_backward=True needs student_logits whose elements do not share memory (a "
                         f"broadcast view has strides {tuple(student_logits.stride())}); pass a copy or "
                         "inplace_backward=False")
    backend = resolve_backend(backend, student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    active = active_positions(lead, student_logits.device, labels, mask, ignore_index)
    total, parts = apply_loss(student_logits, teacher_logits, active,
                              row_labels(labels) if spec.has_ce else None,
                              spec, backend, return_components, inplace_backward)
    loss = reduce_rows(total, active, lead, reduction, num_items_in_batch)
    if not return_components:
        return loss
    csd, ce = (reduce_rows(part, active, lead, reduction, num_items_in_batch) for part in parts)
    return loss, csd, ce


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    temperature_squared: bool = False,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch: Union[None, int, torch.Tensor] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """KL divergence between the teacher's and the student's softened distributions, from logits.

    With p_S = softmax(s / temperature) and p_T = softmax(t / temperature) over each row's valid
    entries::

        kind="forward":  KL(p_T || p_S) = sum_k p_T(k) (log p_T(k) - log p_S(k))   (mode-covering)
        kind="reverse":  KL(p_S || p_T) = sum_k p_S(k) (log p_S(k) - log p_T(k))   (mode-seeking)

    This is the true KL, not the cross-entropy sum_k p_T log p_S (which differs by the teacher's
    entropy); it is 0 when the distributions agree. By default the loss is not multiplied by
    temperature**2; `temperature_squared=True` does (Hinton et al.'s convention, which keeps gradient
    magnitudes comparable across temperatures).

    Shapes, dtypes, strides, padded teacher vocabularies, -inf entries, `labels`/`mask`, reductions,
    `num_items_in_batch`, `backend` and `inplace_backward` behave exactly as in `csd_loss`; the same
    single streaming pass computes it. Returns float32 (float64 for float64 inputs).
    """
    temperature, _ = check_inputs(
        student_logits,
        teacher_logits,
        temperature=temperature,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
    )
    check_flag("temperature_squared", temperature_squared)
    loss = _apply(kl_spec(kind, temperature), student_logits, teacher_logits, labels, ignore_index,
                  mask, reduction, num_items_in_batch, backend, inplace_backward)
    return loss * temperature**2 if temperature_squared else loss


_SHARED_KEYWORDS = {
    "temperature", "labels", "ignore_index", "mask", "reduction", "num_items_in_batch", "backend",
    "inplace_backward",
}


class _LossModule(torch.nn.Module):
    """A loss function as a module: keyword arguments fixed at construction, validated there.

    `labels`, `mask` and `num_items_in_batch` may also be given per call to `forward`.
    """

    _function = None
    _keywords = frozenset()

    def __init__(self, **kwargs):
        super().__init__()
        unknown = set(kwargs) - self._keywords
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown keyword argument(s) {sorted(unknown)}")
        self.kwargs = kwargs
        # Every argument is checked now, not at the first call (tensors' shapes and devices excepted).
        check_options(**{k: kwargs[k] for k in ("temperature", "teacher_temperature", "ignore_index",
                                               "reduction", "backend", "num_items_in_batch") if k in kwargs})
        check_flag("inplace_backward", kwargs.get("inplace_backward", False))
        for name in ("labels", "mask"):
            if kwargs.get(name) is not None and not isinstance(kwargs[name], torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(kwargs[name]).__name__}")
        self._validate()

    def _validate(self):
        pass

    def forward(self, student_logits, teacher_logits, **call_kwargs):
        return type(self)._function(student_logits, teacher_logits, **{**self.kwargs, **call_kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class CSDLoss(_LossModule):
    """`csd_loss` as an nn.Module, e.g. CSDLoss(weighting="ts", temperature=2.0, ce_weight=0.5)."""

    _function = csd_loss
    _keywords = _SHARED_KEYWORDS | {"weighting", "teacher_temperature", "ce_weight", "csd_weight",
                                    "return_components", "validate_labels"}

    def _validate(self):
        kw = self.kwargs
        parse_weighting(kw.get("weighting", "ss"))
        check_loss_weight("ce_weight", kw.get("ce_weight", 0.0))
        check_loss_weight("csd_weight", kw.get("csd_weight", 1.0))
        for flag in ("return_components", "validate_labels"):
            check_flag(flag, kw.get(flag, False))


class KLLoss(_LossModule):
    """`kl_loss` as an nn.Module, e.g. KLLoss(kind="reverse", temperature=2.0)."""

    _function = kl_loss
    _keywords = _SHARED_KEYWORDS | {"kind", "temperature_squared"}

    def _validate(self):
        kl_spec(self.kwargs.get("kind", "forward"), 1.0)
        check_flag("temperature_squared", self.kwargs.get("temperature_squared", False))
