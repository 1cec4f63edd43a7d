"""The autograd function behind `csd_loss` and `kl_loss`, shared by every backend.

It returns per-position losses (N,) and leaves the reduction to ordinary autograd ops on that small
vector, so the backward kernel receives a per-row upstream gradient for every reduction (a stride-0
expanded scalar for "mean" and "sum", the caller's tensor for "none").
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .contract import LossSpec

_BACKEND_MODULES = {
    "torch": "csd_kernels.kernels.torch_backend",
    "triton": "csd_kernels.kernels.triton_backend",
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


def resolve_backend(backend: str, student: torch.Tensor, teacher: torch.Tensor) -> str:
    """"auto" means Triton for CUDA tensors when Triton is installed, PyTorch otherwise (and for float64,
    which the Triton kernels, computing in fp32, do not take)."""
    device = student.device
    float64 = torch.float64 in (student.dtype, teacher.dtype)
    if backend == "auto":
        return "triton" if device.type == "cuda" and not float64 and _triton_importable() else "torch"
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


def backend_module(name: str) -> ModuleType:
    # Imported lazily: importing csd_kernels must not import triton (or query a GPU).
    return importlib.import_module(_BACKEND_MODULES[name])


class LossFunction(torch.autograd.Function):
    """(student, teacher, active, labels) -> per-position total loss (N,) and, if asked, the detached
    components (2, N) = [loss, cross-entropy] (an empty tensor otherwise). Gradient for `student` only."""

    @staticmethod
    def forward(ctx, student, teacher, active, labels, spec: LossSpec, backend: str,
                inplace_backward: bool, components: bool):
        kernels = backend_module(backend)
        total, parts, stats = kernels.forward(student, teacher, active, labels, spec, components)
        ctx.save_for_backward(student, teacher, active, labels, stats)
        ctx.spec, ctx.backend, ctx.inplace_backward = spec, backend, inplace_backward
        parts = parts if parts is not None else total.new_empty(0)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_rows, _grad_parts):
        student, teacher, active, labels, stats = ctx.saved_tensors
        kernels = backend_module(ctx.backend)
        out = student if ctx.inplace_backward else None
        grad = kernels.backward(student, teacher, active, labels, stats, grad_rows, ctx.spec, out=out)
        if ctx.inplace_backward:
            # The logits now hold their gradient: any other saved use of them must fail loudly.
            torch.autograd.graph.increment_version(student)
        return grad, None, None, None, None, None, None, None
