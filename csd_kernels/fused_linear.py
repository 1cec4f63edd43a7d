"""`fused_linear_csd_loss`: CSD from hidden states without ever materialising the full logits.

At N = 8192 positions and V = 256000 one bf16 logits tensor is 4 GB and its fp32 softmax 8 GB. Here
positions are processed in chunks of C rows: for each chunk the student (and, if given as hidden
states, the teacher) logits are computed by a GEMM with fp32 output, the CSD statistics and gradient
kernels run on the chunk, the logits gradient overwrites the chunk's logits in place, and it is folded
at once into grad_hidden (chunk rows) and grad_weight / grad_bias (accumulated in fp32, cast at the
end). The logits stay fp32 until the loss kernels have read them: rounding them to bf16 first is a
known source of 4-23% gradient error in fused-linear losses.

Extra memory: O(C x V) for one chunk's logits (plus the teacher's) and the fp32 V x H accumulator of
grad_weight. For "mean" and "sum" the gradients are computed during the forward (one pass: one GEMM
forward, two backward) and scaled by the upstream gradient in the backward; reduction="none" needs the
per-position upstream gradient, so its backward recomputes the logits (one GEMM more).

Output heads that post-process their logits (Cohere's `logit_scale`, Gemma 2's final-logit softcapping)
are covered: each chunk's logits become softcap * tanh(logit_scale * z / softcap) in place, and the
kernels' logits gradient is chained through that (dL/dz = logit_scale * (1 - (s / softcap)^2) * dL/ds,
from the post-processed s itself) before the GEMMs; the teacher's hidden-state logits likewise.

Excluded positions (labels == ignore_index, mask False) are skipped entirely: the valid rows are
compacted first, which costs one device-to-host synchronisation per call (to learn their number).
`compact_rows=False` avoids it (for CUDA graphs) at the price of computing the excluded rows' logits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .ops import backend_module, resolve_backend
from .contract import (
    LossSpec,
    active_positions,
    check_flag,
    check_inputs,
    check_labels_in_range,
    check_logit_postprocessing,
    check_loss_weight,
    mean_denominator,
    parse_weighting,
    row_labels,
)

_CSD_KEYWORDS = {
    "weighting", "temperature", "teacher_temperature", "labels", "ignore_index", "mask", "reduction",
    "num_items_in_batch", "backend", "ce_weight", "csd_weight", "validate_labels", "return_components",
}
_MM_OUT_DTYPE = [True]  # whether mm/addmm(..., out_dtype=torch.float32) work for CUDA tensors
# Rows per chunk: the chunk's fp32 logits (student, teacher) take at most this many bytes.
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def default_chunk_size(n_rows: int, vocab: int, teacher_vocab: int, device: torch.device) -> int:
    """The documented rule: fit one chunk's fp32 student and teacher logits in a byte budget.

    The budget is 1 GiB on CUDA (capped at a quarter of the free memory) and 64 MiB on a CPU; the
    chunk is a multiple of 8 rows when it can be, and never more than N.
    """
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cuda"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # a driver query, not a stream synchronisation
        budget = min(budget, free // 4)
    rows = max(1, budget // (4 * (vocab + teacher_vocab)))
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(rows, n_rows))


def _postprocess(logits: torch.Tensor, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """softcap * tanh(scale * logits / softcap) (no tanh without a softcap), in place on fp32 logits."""
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _logits_fp32(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden @ weight.T (+ bias) with an fp32 result, from inputs in their own dtype where possible."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        out = hidden @ weight.t()
    elif hidden.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            out = torch.mm(hidden, weight.t(), out_dtype=torch.float32)  # low-precision GEMM, fp32 output
        except (RuntimeError, TypeError):  # a PyTorch without mm(out_dtype=): upcast instead, from now on
            _MM_OUT_DTYPE[0] = False
            return _logits_fp32(hidden, weight, bias)
    else:  # no mixed-precision GEMM with fp32 output here; on CPU `weight` was upcast once by the caller
        out = hidden.float() @ weight.float().t()
    if bias is not None:
        out += bias.float()
    return out


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with a low-precision GEMM accumulating in fp32 where the device has one."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b.to(torch.float32))
        return
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # a PyTorch without addmm(out_dtype=): fp32 from now on
            _MM_OUT_DTYPE[0] = False
    acc.addmm_(a.float(), b.float())


def _run_chunks(hidden, weight, bias, post, teacher, rows, active, labels, spec, kernels, chunk_size,
                grad_rows=None, want_grads=False, components=False):
    """Stream the rows in chunks: per-position losses (and their (2, N) [CSD, CE] components if asked),
    and the gradients if `want_grads`.

    `post` is the student's (logit_scale, softcap); `teacher` is ("logits", tensor (N, V_t)) or
    ("hidden", (hidden, weight, bias, (logit_scale, softcap))). `grad_rows` is the upstream gradient per
    position (N,) or a one-element tensor broadcast to every position."""
    scale, softcap = post
    n_rows = hidden.shape[0]
    row_loss = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    row_parts = torch.zeros(2, n_rows, dtype=torch.float32, device=hidden.device) if components else None
    grads = None
    if want_grads:
        grads = (
            torch.zeros_like(hidden),
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device),
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None,
        )
    for start in range(0, rows.numel(), chunk_size):
        index = rows[start : start + chunk_size]
        h = hidden.index_select(0, index)
        s = _postprocess(_logits_fp32(h, weight, bias), scale, softcap)
        if teacher[0] == "logits":
            t = teacher[1].index_select(0, index)
        else:
            t_hidden, t_weight, t_bias, t_post = teacher[1]
            t = _postprocess(_logits_fp32(t_hidden.index_select(0, index), t_weight, t_bias), *t_post)
        act = active.index_select(0, index)
        lab = labels.index_select(0, index) if spec.has_ce else None
        total, parts, stats = kernels.forward(s, t, act, lab, spec, components)
        row_loss.index_copy_(0, index, total.float())
        if components:
            row_parts.index_copy_(1, index, parts.float())
        if not want_grads:
            continue
        upstream = grad_rows.expand(index.numel()) if grad_rows.numel() == 1 else grad_rows.index_select(0, index)
        if softcap is None:
            g = kernels.backward(s, t, act, lab, stats, upstream, spec, out=s)  # the logits' storage
        else:  # the chain factor needs s: one more chunk-sized buffer
            g = kernels.backward(s, t, act, lab, stats, upstream, spec)
            g.mul_(s.div_(softcap).square_().neg_().add_(1.0))
        if scale != 1.0:
            g.mul_(scale)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_bias is not None:
            grad_bias += g.sum(0)
        if weight.dtype != g.dtype:
            # Low-precision weights (CUDA): the logits gradient goes into the GEMMs in their dtype, as
            # in unfused training (never the V x H weight upcast to fp32, which would cost 4 bytes per
            # weight per chunk). grad_weight still accumulates in fp32.
            g = g.to(weight.dtype)
        grad_hidden.index_copy_(0, index, (g @ weight).to(hidden.dtype))
        _accumulate(grad_weight, g.t(), h)
    return row_loss, grads, row_parts


class FusedLinearCSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, post, teacher_kind, teacher_parts, active, labels, spec, backend,
                chunk_size, reduction, denominator, compact_rows, want_grads, components):
        kernels = backend_module(backend)
        rows = active.nonzero().squeeze(1) if compact_rows else torch.arange(active.numel(), device=active.device)
        # On a CPU there is no low-precision GEMM with fp32 output: upcast the weight once per call.
        w = weight if weight.is_cuda or weight.dtype == torch.float32 else weight.float()
        teacher = (teacher_kind, teacher_parts)
        if teacher_kind == "hidden" and not teacher_parts[1].is_cuda:
            th, tw, tb, t_post = teacher_parts
            teacher = ("hidden", (th, tw.float(), tb, t_post))
        ctx.reduction = reduction
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        scale = torch.ones(1, device=hidden.device)
        if denominator is not None:  # reduction="mean": every position's upstream gradient is 1/denominator
            scale = scale / denominator
        reduce = (lambda x: x) if reduction == "none" else (lambda x: x.sum(-1) * scale.reshape(()))  # noqa: E731
        if not want_grads or reduction == "none":
            row_loss, _, parts = _run_chunks(hidden, w, bias, post, teacher, rows, active, labels, spec, kernels,
                                             chunk_size, components=components)
            if want_grads:  # reduction="none": the upstream gradient per position comes later, so recompute then
                ctx.save_for_backward(hidden, weight, bias, rows, active, labels)
                ctx.teacher, ctx.spec, ctx.backend, ctx.chunk_size, ctx.post = teacher, spec, backend, chunk_size, post
        else:
            row_loss, grads, parts = _run_chunks(hidden, w, bias, post, teacher, rows, active, labels, spec,
                                                 kernels, chunk_size, grad_rows=scale, want_grads=True,
                                                 components=components)
            ctx.save_for_backward(*[g for g in grads if g is not None])
            ctx.has_bias = bias is not None
        parts = reduce(parts) if components else row_loss.new_empty(0)
        ctx.mark_non_differentiable(parts)
        return reduce(row_loss), parts

    @staticmethod
    def backward(ctx, grad_output, grad_parts):
        if ctx.reduction == "none":
            hidden, weight, bias, rows, active, labels = ctx.saved_tensors
            w = weight if weight.is_cuda or weight.dtype == torch.float32 else weight.float()
            _, (grad_hidden, grad_weight, grad_bias), _ = _run_chunks(
                hidden, w, bias, ctx.post, ctx.teacher, rows, active, labels, ctx.spec,
                backend_module(ctx.backend), ctx.chunk_size, grad_rows=grad_output.float(), want_grads=True)
        else:
            saved = ctx.saved_tensors
            grad_hidden, grad_weight = saved[0], saved[1]
            grad_bias = saved[2] if ctx.has_bias else None
            scale = grad_output.float()
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
            grad_weight = grad_weight * scale
            grad_bias = grad_bias * scale if grad_bias is not None else None
        # fp32 accumulators, cast once at the end
        grad_weight = grad_weight.to(ctx.weight_dtype)
        grad_bias = grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 13


def fused_linear_csd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    compact_rows: bool = True,
    **csd_loss_keywords,
) -> torch.Tensor:
    """`csd_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, ...)` without the logits.

    With post-processing the student's logits are softcap * tanh(logit_scale * z / softcap), z = h W^T + b
    (logit_scale * z without a softcap), and likewise the teacher's when it comes as hidden states.

    Args:
        student_hidden: (..., H_s) fp32, bf16 or fp16: the student's final hidden states.
        student_weight: (V_s, H_s), same dtype: the student's output projection (lm_head).
        teacher_logits: (..., V_t) with V_t >= V_s, or None when the teacher is given as
            `teacher_hidden` (..., H_t) and `teacher_weight` (V_t, H_t) (H_t may differ from H_s).
        student_bias, teacher_bias: optional (V_s,) and (V_t,).
        logit_scale, softcap: the student head's post-processing (Cohere's `logit_scale`, Gemma 2's
            `final_logit_softcapping`; `integrations.transformers.logit_postprocessing` reads them from a
            config). logit_scale a finite real number, softcap None or finite > 0.
        teacher_logit_scale, teacher_softcap: the same for a teacher given as hidden states (teacher
            logits are taken as already post-processed).
        chunk_size: rows per chunk; default `default_chunk_size` (a byte budget for one chunk's logits).
        compact_rows: skip excluded positions entirely (one host synchronisation to count them).
        **csd_loss_keywords: weighting, temperature, teacher_temperature, labels, ignore_index, mask,
            reduction, num_items_in_batch, backend, ce_weight, csd_weight, validate_labels,
            return_components, exactly as in `csd_loss`.

    Returns the loss as `csd_loss` would (fp32), with gradients for `student_hidden`,
    `student_weight` and `student_bias`; the teacher gets none.
    """
    unknown = set(csd_loss_keywords) - _CSD_KEYWORDS
    if unknown:
        raise TypeError(f"fused_linear_csd_loss got unsupported keyword argument(s) {sorted(unknown)}")
    kw = csd_loss_keywords
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if student_hidden.dim() < 1 or student_weight.dim() != 2:
        raise ValueError(f"student_hidden must be (..., H) and student_weight (V, H), got shapes "
                         f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}")
    hidden_size = student_hidden.shape[-1]
    if student_weight.shape[1] != hidden_size:
        raise ValueError(f"student_weight must be (V_s, H_s={hidden_size}), got {tuple(student_weight.shape)}")
    vocab = student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    device = student_hidden.device
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden and teacher_weight")
    if teacher_logits is None:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_weight must be (V_t, H_t={teacher_hidden.shape[-1]}), got "
                             f"{tuple(teacher_weight.shape)}")
        if tuple(teacher_hidden.shape[:-1]) != tuple(lead):
            raise ValueError(f"teacher_hidden must have the leading shape {tuple(lead)}, got "
                             f"{tuple(teacher_hidden.shape[:-1])}")
        teacher_vocab = teacher_weight.shape[0]
        teacher_dtype = teacher_hidden.dtype
    else:
        teacher_vocab = teacher_logits.shape[-1] if isinstance(teacher_logits, torch.Tensor) else 0
        teacher_dtype = teacher_logits.dtype if isinstance(teacher_logits, torch.Tensor) else None
    for name, bias, size in (("student_bias", student_bias, vocab), ("teacher_bias", teacher_bias, teacher_vocab)):
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (size,)):
            raise ValueError(f"{name} must be a ({size},) tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    for name, x in (("student_weight", student_weight), ("teacher_logits", teacher_logits),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(f"student_weight ({student_weight.dtype}) must have student_hidden's dtype "
                        f"({student_hidden.dtype})")

    # The logits contract, checked on shape-only stand-ins of the logits this function never builds.
    stand_in_student = torch.empty(*lead, vocab, dtype=student_hidden.dtype, device="meta")
    stand_in_teacher = (teacher_logits if teacher_logits is not None and not isinstance(teacher_logits, torch.Tensor)
                        else torch.empty(*lead, teacher_vocab, dtype=teacher_dtype, device="meta"))
    labels, mask = kw.get("labels"), kw.get("mask")
    meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    temperature, teacher_temperature = check_inputs(
        stand_in_student, stand_in_teacher, temperature=kw.get("temperature", 1.0),
        teacher_temperature=kw.get("teacher_temperature", 1.0), labels=meta(labels),
        ignore_index=kw.get("ignore_index", -100), mask=meta(mask),
        reduction=kw.get("reduction", "mean"), num_items_in_batch=kw.get("num_items_in_batch"),
        backend=kw.get("backend", "auto"))
    for name, x in (("labels", labels), ("mask", mask)):
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")
    ce_weight = check_loss_weight("ce_weight", kw.get("ce_weight", 0.0))
    csd_weight = check_loss_weight("csd_weight", kw.get("csd_weight", 1.0))
    if ce_weight > 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} needs `labels` (the targets of the cross-entropy)")
    if kw.get("validate_labels", False) and labels is not None:
        check_labels_in_range(labels, vocab, kw.get("ignore_index", -100), mask)
    check_flag("compact_rows", compact_rows)
    post = check_logit_postprocessing("logit_scale", logit_scale, "softcap", softcap)
    teacher_post = check_logit_postprocessing("teacher_logit_scale", teacher_logit_scale, "teacher_softcap",
                                              teacher_softcap)
    if teacher_logits is not None and teacher_post != (1.0, None):
        raise ValueError(f"teacher_logit_scale={teacher_logit_scale} / teacher_softcap={teacher_softcap} apply to "
                         "a teacher given as hidden states; teacher_logits are used as they are")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    spec = LossSpec(*parse_weighting(kw.get("weighting", "ss")), temperature, teacher_temperature,
                    csd_weight=csd_weight, ce_weight=ce_weight)
    backend = resolve_backend(kw.get("backend", "auto"),
                              torch.empty(0, dtype=torch.float32, device=device),  # fp32 logits
                              torch.empty(0, dtype=teacher_dtype, device=device))

    n_rows = math.prod(lead)
    hidden = student_hidden.reshape(n_rows, hidden_size)
    if teacher_logits is not None:  # the teacher never gets a gradient
        teacher = ("logits", teacher_logits.detach().reshape(n_rows, teacher_vocab))
    else:
        teacher = ("hidden", (teacher_hidden.detach().reshape(n_rows, teacher_hidden.shape[-1]),
                              teacher_weight.detach(), teacher_bias.detach() if teacher_bias is not None else None,
                              teacher_post))
    active = active_positions(lead, device, labels, mask, kw.get("ignore_index", -100))
    flat_labels = row_labels(labels) if (labels is not None and spec.has_ce) else None
    reduction = kw.get("reduction", "mean")
    denominator = None
    if reduction == "mean":
        denominator = mean_denominator(active, kw.get("num_items_in_batch"), torch.float32)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, vocab, teacher_vocab, device)
    # Evaluation loops (no_grad, inference_mode, frozen weights) get the loss without the gradient work.
    want_grads = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    components = check_flag("return_components", kw.get("return_components", False))
    loss, parts = FusedLinearCSDFunction.apply(
        hidden, student_weight, student_bias, post, teacher[0], teacher[1], active, flat_labels, spec, backend,
        chunk_size, reduction, denominator, compact_rows, want_grads, components)
    shape = (lambda x: x.view(lead)) if reduction == "none" else (lambda x: x)  # noqa: E731
    return (shape(loss), shape(parts[0]), shape(parts[1])) if components else shape(loss)
