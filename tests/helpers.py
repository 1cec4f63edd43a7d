"""Comparison helpers: per-dtype tolerances in one place and failures that show the worst element."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (rtol, atol) by the dtype of the compared tensor. Losses are fp32 whatever the input dtype, computed
# from the same (upcast) inputs as the reference, so only summation order differs. Gradients come back
# in the student's dtype: one rounding (or, under the Triton interpreter, truncation) of the result.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (2e-3, 1e-6),
}


def _as_float64(*tensors):
    return [x.detach().to(torch.float64).cpu() for x in tensors]


def _check_bound(name, actual, expected, bound_of, criterion, plain=None):
    """Fail unless the NaN patterns agree and |actual - expected| <= bound_of(expected) elementwise,
    naming how many elements fail, the worst one's index and its values."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert bool(same_nan.all()), f"{name}: NaN pattern differs at {torch.nonzero(~same_nan)[:5].tolist()}"
    a, e = torch.nan_to_num(actual), torch.nan_to_num(expected)
    excess = (a - e).abs() - bound_of(e)
    if excess.numel() and excess.max() > 0:
        worst = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        also = f", plain {torch.nan_to_num(plain).flatten()[worst].item():.9g}" if plain is not None else ""
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {e.numel()} elements {criterion}; worst at index {index}: "
            f"got {a.flatten()[worst].item():.9g}, expected {e.flatten()[worst].item():.9g}{also}"
        )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, name="value", scale=None):
    """assert |actual - expected| <= atol * scale + rtol * |expected| elementwise, reporting the worst.

    `scale` (default: max |expected|) makes atol relative to the tensor's magnitude, so tiny entries
    next to large ones do not need an absurd relative accuracy.
    """
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    actual, expected = _as_float64(actual, expected)
    if scale is None:
        scale = torch.nan_to_num(expected).abs().max().item() if expected.numel() else 1.0
    scale = max(scale, 1.0)
    _check_bound(name, actual, expected, lambda e: atol * scale + rtol * e.abs(),
                 f"out of tolerance (rtol={rtol}, atol={atol} x {scale:.3g})")


# Low-precision results (bf16/fp16 gradients) are judged by the plain low-precision computation of the
# same maths (Cut Cross-Entropy's criterion), so that one test means the same on the interpreter, which
# truncates bf16 stores, and on a GPU, whose compiled kernels round: elementwise, the error against a
# float64 ground truth may be at most LOWP_FACTOR times that of the plain result (never held below half
# an ulp of the dtype), plus the dtype's atol of the table above times the tensor's scale.
LOWP_FACTOR = 2.0


def assert_close_lowp(actual, exact, naive, *, name="value", factor=LOWP_FACTOR):
    """|actual - exact| <= factor * max(|naive - exact|, ulp/2) + atol * scale, reporting the worst element.

    `exact`: the float64 ground truth; `naive`: the plain computation's result in actual's dtype."""
    dtype = actual.dtype
    _, atol = TOLERANCES[dtype]
    a, e, n = _as_float64(actual, exact, naive)
    assert n.shape == e.shape, f"{name}: plain result shape {tuple(n.shape)} != {tuple(e.shape)}"
    scale = max(torch.nan_to_num(e).abs().max().item(), 1.0) if e.numel() else 1.0
    naive_error = torch.nan_to_num((n - e).abs())

    def bound(e_):
        return factor * torch.maximum(naive_error, e_.abs() * (torch.finfo(dtype).eps / 2)) + atol * scale

    _check_bound(name, a, e, bound, f"beyond {factor}x the plain {dtype} error", plain=n)


def loss_and_grad(fn, student, teacher, upstream=None, **kwargs):
    """Run fn(student, teacher, **kwargs) and its backward; returns (loss, d loss / d student)."""
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, **kwargs)
    if upstream is None:
        upstream = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, student, upstream)
    return loss.detach(), grad


def assert_gradient(grad, ref_grad, reference_fn, student, teacher, upstream=None, *, name="gradient", **kwargs):
    """The gradient check of the parity tests: for a bf16/fp16 student, the low-precision criterion
    against `reference_fn` in float64 (with `ref_grad`, the plain computation's gradient); otherwise
    `assert_close` with the table's tolerance."""
    if student.dtype not in (torch.bfloat16, torch.float16):
        assert_close(grad, ref_grad, name=name)
        return
    _, exact = loss_and_grad(reference_fn, student.double(), teacher.double(), upstream, **kwargs)
    assert_close_lowp(grad, exact, ref_grad, name=name)
