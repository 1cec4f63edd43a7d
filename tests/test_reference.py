"""The reference against the definition, the authors' gradient, gradcheck and properties of the loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import reference
from csd_kernels import csd_loss, kl_loss
from helpers import assert_close, loss_and_grad
from test_csd_loss import MIX, WEIGHTINGS, WEIGHTING_IDS


def logits64(n=4, vocab=9, spread=2.0):
    student = spread * torch.randn(n, vocab, dtype=torch.float64)
    return student, student + torch.randn(n, vocab, dtype=torch.float64)


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=WEIGHTING_IDS)
def test_closed_form_equals_pairwise_definition(weighting):
    student, teacher = logits64()
    student[0, 2] = -math.inf
    teacher[1, :4] = -math.inf
    kwargs = dict(weighting=weighting, temperature=1.7, teacher_temperature=0.6, reduction="none")
    loss, grad = loss_and_grad(reference.csd_loss, student, teacher, **kwargs)
    pair_loss, pair_grad = loss_and_grad(reference.csd_loss_pairwise, student, teacher, **kwargs)
    assert_close(loss, pair_loss, name="closed form vs pairwise")
    assert_close(grad, pair_grad, name="closed-form gradient vs pairwise gradient")


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=WEIGHTING_IDS)
def test_gradient_formula_matches_authors_surrogate(weighting):
    student, teacher = logits64(vocab=30)
    _, grad = loss_and_grad(reference.csd_loss, student, teacher, weighting=weighting, temperature=2.0)
    _, authors = loss_and_grad(reference.csd_loss_authors, student, teacher, weighting=weighting,
                               temperature=2.0)
    assert_close(grad, authors, name="gradient vs the authors' surrogate gradient")


def test_ss_gradient_is_student_weighted_deviation():
    """"ss" at temperature tau: dloss/ds_k = S(k) (d_k - E_S[d]), S = softmax(s / tau), d unscaled."""
    student, teacher = logits64(vocab=20)
    _, grad = loss_and_grad(reference.csd_loss, student, teacher, reduction="sum", temperature=3.0)
    weights = torch.softmax(student / 3.0, dim=-1)
    d = student - teacher
    expected = weights * (d - (weights * d).sum(-1, keepdim=True))
    assert_close(grad, expected, name="ss gradient")


def test_ss_gradient_is_reverse_kl_gradient_at_temperature_1():
    """At temperature 1, S(k) (d_k - E_S[d]) is also the gradient of KL(S || T): "ss" and reverse KL train
    identically under a scale-free optimiser (examples/compare_losses.py shows it), though their values differ."""
    student, teacher = logits64(n=6, vocab=25)
    for impl in (reference, None):
        csd_fn = reference.csd_loss if impl else csd_loss
        kl_fn = reference.kl_loss if impl else kl_loss
        loss_csd, grad_csd = loss_and_grad(csd_fn, student, teacher, weighting="ss")
        loss_kl, grad_kl = loss_and_grad(kl_fn, student, teacher, kind="reverse")
        assert_close(grad_csd, grad_kl, name="ss gradient vs reverse-KL gradient")
        assert not torch.allclose(loss_csd, loss_kl)


# The weights are constants by contract, so the backward is the true derivative of the loss only when no
# weight depends on the student: gradcheck those weightings; the others are pinned to the pairwise
# definition (autograd with detached weights) and the authors' gradient above.
@pytest.mark.parametrize("weighting", ["tt", "uu", "tu", ({"teacher": 0.4, "uniform": 0.6}, "teacher")],
                         ids=["tt", "uu", "tu", "mix"])
@pytest.mark.parametrize("impl", ["reference", "torch-backend"])
def test_gradcheck_float64(weighting, impl):
    fn = reference.csd_loss if impl == "reference" else (lambda s, t, **k: csd_loss(s, t, backend="torch", **k))
    student, teacher = logits64(n=3, vocab=7)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: fn(s, teacher, weighting=weighting, temperature=1.3, reduction="none"), (student,)
    )


def test_kl_reference_matches_torch_kl_div():
    student, teacher = logits64(vocab=11)
    log_p_s = torch.log_softmax(student / 2.0, -1)
    log_p_t = torch.log_softmax(teacher / 2.0, -1)
    forward = torch.nn.functional.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)
    reverse = torch.nn.functional.kl_div(log_p_t, log_p_s, log_target=True, reduction="none").sum(-1)
    assert_close(reference.kl_loss(student, teacher, temperature=2.0, reduction="none"), forward)
    assert_close(reference.kl_loss(student, teacher, kind="reverse", temperature=2.0, reduction="none"),
                 reverse)


# ---------------------------------------------------------------------------------------------------
# properties, for any logits
# ---------------------------------------------------------------------------------------------------
_rows = hs.integers(1, 4)
_vocab = hs.integers(1, 12)
_weightings = hs.sampled_from(["ss", "ts", "us", "tt", "uu", MIX])
_temperatures = hs.floats(0.25, 4.0)


def _draw_logits(seed, n, vocab, spread):
    g = torch.Generator().manual_seed(seed)
    student = spread * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    teacher = spread * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    return student, teacher


@settings(max_examples=60, deadline=None)
@given(hs.integers(0, 2**31 - 1), _rows, _vocab, hs.floats(0.01, 20.0), _weightings, _temperatures)
def test_property_nonnegative_and_matches_definition(seed, n, vocab, spread, weighting, tau):
    student, teacher = _draw_logits(seed, n, vocab, spread)
    kw = dict(weighting=weighting, temperature=tau, reduction="none")
    loss = csd_loss(student, teacher, backend="torch", **kw)
    assert bool((loss >= 0).all())
    assert_close(loss, reference.csd_loss_pairwise(student, teacher, **kw), name="torch backend vs definition")


@settings(max_examples=40, deadline=None)
@given(hs.integers(0, 2**31 - 1), _rows, hs.integers(2, 12), _weightings, hs.floats(-1e3, 1e3))
def test_property_zero_iff_difference_is_constant(seed, n, vocab, weighting, offset):
    student, _ = _draw_logits(seed, n, vocab, 3.0)
    loss = csd_loss(student, student - offset, backend="torch", weighting=weighting, reduction="none")
    assert bool((loss.abs() <= 1e-9).all())
    perturbed = student.clone()
    perturbed[:, 0] += 1.0  # d no longer constant, and every weighting gives entry 0 some weight
    assert bool((csd_loss(perturbed, student, backend="torch", weighting=weighting, reduction="none") > 0).all())


@settings(max_examples=40, deadline=None)
@given(hs.integers(0, 2**31 - 1), _rows, _vocab, _weightings, hs.floats(-50, 50), hs.floats(-50, 50))
def test_property_invariant_to_row_constants(seed, n, vocab, weighting, a, b):
    student, teacher = _draw_logits(seed, n, vocab, 2.0)
    kw = dict(weighting=weighting, reduction="none", backend="torch")
    assert_close(csd_loss(student + a, teacher + b, **kw), csd_loss(student, teacher, **kw),
                 name="shifted rows")
