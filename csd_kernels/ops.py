"""The losses as PyTorch custom operators, with their autograd formulas: what the public functions call.

Operators registered with `torch.library.custom_op` (PyTorch >= 2.4):

    csd_kernels::distill_rows(student, teacher, active, labels?, <loss spec>, backend, components)
        -> (total (N,), components (2, N) or (0,), row statistics (N, stats.NUM_STATS))
    csd_kernels::distill_rows_backward(student, teacher, active, labels?, stats, grad_rows, <spec>,
        backend, inplace) -> gradient w.r.t. student
    csd_kernels::topk_student(student, ids, active, labels?, stream, backend)
        -> (support logits (N, K), tail log-sum-exp (N,), row log-sum-exp (N,), s[label] (N,))
    csd_kernels::topk_student_backward(...) -> gradient w.r.t. student

(the last two are the student's side of the top-k losses' coarsened rows, topk.py)

with `register_fake` (shapes for FakeTensor tracing) and `register_autograd`, so `torch.compile`
(fullgraph=True, static or dynamic shapes) treats each as one opaque node instead of breaking the graph
at a Python autograd.Function or a Triton launch. `custom_op` rather than `torch.library.triton_op`:
the same operator must run the PyTorch backend and the Triton interpreter on CPU, and an opaque node is
all the compiler needs (it has nothing to fuse across a streaming pass over the vocabulary). Shapes are
runtime kernel arguments, never `tl.constexpr`, so a new sequence length does not recompile the Triton
kernels (Triton may specialise an int on divisibility by 16, which bounds the variants at two).

`inplace` writes the gradient into the student logits' storage: the backward operator then declares
that it mutates `student`, which bumps its version counter.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .contract import KINDS, LossSpec
from .kernels import stats as st
from .kernels.torch_backend import _label_logits

# (family, backend) -> module: the dense losses' streaming pass, and the top-k losses' student pass.
_BACKEND_MODULES = {
    ("dense", "torch"): "csd_kernels.kernels.torch_backend",
    ("dense", "triton"): "csd_kernels.kernels.triton_backend",
    ("dense", "inductor"): "csd_kernels.kernels.inductor_backend",
    ("topk", "torch"): "csd_kernels.kernels.topk_torch",
    ("topk", "triton"): "csd_kernels.kernels.topk_triton",
    ("topk", "inductor"): "csd_kernels.kernels.topk_inductor",
}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreter_on() -> bool:
    # Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when our kernel module is
    # first imported; this reads the same switch.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# "auto" picks the compiled CPU backend from N * V = 2^20 logits up. Below, the chunked backend is slower
# per call (forward + backward, fp32, 2 cores: 6-9 ms at 480 x 250 and 16-19 ms at 1024 x 512 for "ss"
# and "ts", against 2.3-4.4 ms compiled), but one compilation per variant (7-13 s) pays only after about
# a thousand calls at those sizes: too late for tests and short runs. backend="inductor" asks for it.
INDUCTOR_MIN_ELEMENTS = 1 << 20


def _inductor_available() -> bool:
    return importlib.import_module(_BACKEND_MODULES["dense", "inductor"]).available()


# Under an outer torch.compile this must run untraced, as a constant (it imports a module and looks for a
# compiler). This is what torch.compiler.assume_constant_result does; the decorator itself would import
# torch._dynamo (and with it triton) when csd_kernels is imported.
_inductor_available._dynamo_marked_constant = True


def resolve_backend(backend: str, student: torch.Tensor, teacher: torch.Tensor, family: str = "dense") -> str:
    """"auto" means Triton for CUDA tensors when Triton is installed; on a CPU, the Inductor-compiled
    backend for inputs of at least INDUCTOR_MIN_ELEMENTS logits where a C++ compiler is found;
    the chunked PyTorch backend otherwise (and for float64 on a GPU, which the Triton kernels, computing
    in fp32, do not take)."""
    device = student.device
    float64 = torch.float64 in (student.dtype, teacher.dtype)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if not float64 and _triton_importable() else "torch"
        if (device.type == "cpu" and (family, "inductor") in _BACKEND_MODULES
                and student.numel() >= INDUCTOR_MIN_ELEMENTS and _inductor_available()):
            return "inductor"
        return "torch"
    if backend == "inductor":
        if device.type != "cpu":
            raise ValueError(f"backend='inductor' is the compiled CPU backend, got tensors on {device}; "
                             "use backend='triton' or 'torch'")
        if (family, "inductor") not in _BACKEND_MODULES:
            raise ValueError(f"backend='inductor' does not exist for the {family} losses; use backend='torch'")
        if not _inductor_available():
            raise ValueError("backend='inductor' needs a C++ compiler that torch.compile (Inductor) can find; "
                             "none was found: use backend='torch'")
    if backend == "triton":
        if float64:
            raise TypeError(
                "backend='triton' computes in fp32 and does not take float64 logits "
                f"(got {student.dtype} and {teacher.dtype}); use backend='torch'"
            )
        if not _triton_importable():
            raise ValueError("backend='triton' needs the `triton` package, which is not installed")
        if device.type != "cuda" and not _interpreter_on():
            raise ValueError(
                f"backend='triton' runs on CUDA tensors, got tensors on {device}; on CPU set "
                f"TRITON_INTERPRET=1 before importing triton to use Triton's interpreter"
            )
    return backend


def backend_module(name: str, family: str = "dense") -> ModuleType:
    # Imported lazily: importing csd_kernels must not import triton (or query a GPU).
    return importlib.import_module(_BACKEND_MODULES[family, name])


def _spec(w1, w2, temperature, teacher_temperature, kind, csd_weight, ce_weight) -> LossSpec:
    return LossSpec(tuple(w1), tuple(w2), temperature, teacher_temperature, KINDS[kind],
                    csd_weight=csd_weight, ce_weight=ce_weight)


def _result_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


@torch.library.custom_op("csd_kernels::distill_rows", mutates_args=())
def distill_rows(
    student: Tensor, teacher: Tensor, active: Tensor, labels: Optional[Tensor],
    w1: List[float], w2: List[float], temperature: float, teacher_temperature: float, kind: int,
    csd_weight: float, ce_weight: float, backend: str, components: bool, inplace: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _spec(w1, w2, temperature, teacher_temperature, kind, csd_weight, ce_weight)
    total, parts, stats = backend_module(backend).forward(student, teacher, active, labels, spec, components)
    if parts is None:
        parts = total.new_empty(0)
    return total, parts, stats


@distill_rows.register_fake
def _(student, teacher, active, labels, w1, w2, temperature, teacher_temperature, kind, csd_weight,
      ce_weight, backend, components, inplace):
    n_rows, dtype = active.shape[0], _result_dtype(student, teacher)
    parts = student.new_empty((2, n_rows) if components else (0,), dtype=dtype)
    return (student.new_empty(n_rows, dtype=dtype), parts,
            student.new_empty((n_rows, st.NUM_STATS), dtype=dtype))


@torch.library.custom_op("csd_kernels::distill_rows_backward", mutates_args=())
def distill_rows_backward(
    student: Tensor, teacher: Tensor, active: Tensor, labels: Optional[Tensor], stats: Tensor,
    grad_rows: Tensor, w1: List[float], w2: List[float], temperature: float,
    teacher_temperature: float, kind: int, csd_weight: float, ce_weight: float, backend: str,
) -> Tensor:
    spec = _spec(w1, w2, temperature, teacher_temperature, kind, csd_weight, ce_weight)
    return backend_module(backend).backward(student, teacher, active, labels, stats, grad_rows, spec)


@distill_rows_backward.register_fake
def _(student, teacher, active, labels, stats, grad_rows, *args):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


@torch.library.custom_op("csd_kernels::distill_rows_backward_", mutates_args=("student",))
def distill_rows_backward_inplace(
    student: Tensor, teacher: Tensor, active: Tensor, labels: Optional[Tensor], stats: Tensor,
    grad_rows: Tensor, w1: List[float], w2: List[float], temperature: float,
    teacher_temperature: float, kind: int, csd_weight: float, ce_weight: float, backend: str,
) -> None:
    spec = _spec(w1, w2, temperature, teacher_temperature, kind, csd_weight, ce_weight)
    backend_module(backend).backward(student, teacher, active, labels, stats, grad_rows, spec, out=student)


@distill_rows_backward_inplace.register_fake
def _(*args):
    return None


def _setup_context(ctx, inputs, output):
    student, teacher, active, labels, *params = inputs
    ctx.save_for_backward(student, teacher, active, labels, output[2])
    ctx.params = params[:-3]  # (w1, w2, temperature, teacher_temperature, kind, csd_weight, ce_weight)
    ctx.backend, ctx.inplace = params[-3], params[-1]


def _backward(ctx, grad_total, grad_parts, grad_stats):
    student, teacher, active, labels, stats = ctx.saved_tensors
    if ctx.inplace:
        distill_rows_backward_inplace(student, teacher, active, labels, stats, grad_total, *ctx.params,
                                      ctx.backend)
        grad = student
    else:
        grad = distill_rows_backward(student, teacher, active, labels, stats, grad_total, *ctx.params,
                                     ctx.backend)
    return (grad,) + (None,) * 13


distill_rows.register_autograd(_backward, setup_context=_setup_context)


def apply_loss(student, teacher, active, labels, spec: LossSpec, backend: str, components: bool,
               inplace: bool):
    """Call the operator with a LossSpec: (total (N,), components (2, N) or (0,))."""
    total, parts, _ = distill_rows(
        student, teacher, active, labels, list(spec.w1), list(spec.w2), spec.temperature,
        spec.teacher_temperature, spec.kind_code, spec.csd_weight, spec.ce_weight, backend,
        components, inplace)
    return total, parts.detach()  # the components are for logging


# ----------------------------------------------------------------------------------------------------
# Top-k teachers (topk.py): the student's side of the coarsened rows
# ----------------------------------------------------------------------------------------------------
def _log_sum_exp_all(support: Tensor, tail: Tensor) -> Tensor:
    """log-sum-exp of the whole row from its parts: logaddexp(tail, logsumexp of the support logits)."""
    parts = torch.cat([support, tail[:, None]], dim=1)
    m = parts.amax(dim=1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    return (m + (parts - m).exp().sum(dim=1, keepdim=True).log())[:, 0]


@torch.library.custom_op("csd_kernels::topk_student", mutates_args=())
def topk_student(student: Tensor, ids: Tensor, active: Tensor, labels: Optional[Tensor], stream: bool,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(support logits (N, K), tail log-sum-exp (N,), log-sum-exp of the row (N,), s[label] (N,)).

    `ids` (N, K) int32, -1 where not in the support. Without `stream` only the support is read (tail
    -inf). s[label] is 0 without labels, NaN for a label outside [0, V)."""
    support, tail = backend_module(backend, "topk").student_pass(student, ids, active, stream)
    lse = _log_sum_exp_all(support, tail)
    if labels is None:
        label_logit = torch.zeros_like(tail)
    else:
        label_logit = _label_logits(student, labels, ids.shape[0], student.shape[-1], tail.dtype)
    return support, tail, lse, label_logit


@topk_student.register_fake
def _(student, ids, active, labels, stream, backend):
    dtype = _result_dtype(student, student)
    n_rows = ids.shape[0]
    return (ids.new_empty(ids.shape, dtype=dtype),) + tuple(ids.new_empty(n_rows, dtype=dtype) for _ in range(3))


@torch.library.custom_op("csd_kernels::topk_student_backward", mutates_args=())
def topk_student_backward(
    student: Tensor, ids: Tensor, active: Tensor, labels: Optional[Tensor], support: Tensor, tail: Tensor,
    lse: Tensor, grad_support: Tensor, grad_tail: Tensor, grad_lse: Tensor, grad_label: Optional[Tensor],
    stream: bool, backend: str,
) -> Tensor:
    """Chain the gradients of the four outputs onto the full row (the student's shape and dtype):

        off the support  g_j = exp(s_j - tail) * (g_tail + g_lse exp(tail - lse))  [+ g_label at the label]
        on the support   g_k = g_support_k + g_lse exp(s_k - lse)                  [+ g_label at the label]
    """
    keep = active[:, None] & (ids >= 0)
    live = active & (tail != float("-inf"))
    coef = torch.where(live, grad_tail + grad_lse * torch.exp(tail - torch.where(live, lse, 0.0)), 0.0)
    values = grad_support + grad_lse[:, None] * torch.where(support == float("-inf"), 0.0,
                                                            torch.exp(support - lse[:, None]))
    if grad_label is not None:
        values = values + torch.where(ids.long() == labels.reshape(-1, 1), grad_label[:, None], 0.0)
    values = torch.where(keep, values, 0.0)
    return backend_module(backend, "topk").student_backward(
        student, ids, active, labels, tail, coef, values, grad_label, stream)


@topk_student_backward.register_fake
def _(student, *args):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _topk_setup_context(ctx, inputs, output):
    student, ids, active, labels, stream, backend = inputs
    support, tail, lse, _ = output
    ctx.save_for_backward(student, ids, active, labels, support, tail, lse)
    ctx.stream, ctx.backend = stream, backend


def _topk_backward(ctx, grad_support, grad_tail, grad_lse, grad_label):
    student, ids, active, labels, support, tail, lse = ctx.saved_tensors
    zero = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731 (unused outputs)
    grad = topk_student_backward(
        student, ids, active, labels, support, tail, lse, zero(grad_support, support), zero(grad_tail, tail),
        zero(grad_lse, lse), None if labels is None else zero(grad_label, tail), ctx.stream, ctx.backend)
    return grad, None, None, None, None, None


topk_student.register_autograd(_topk_backward, setup_context=_topk_setup_context)
