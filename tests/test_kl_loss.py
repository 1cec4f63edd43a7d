"""Parity of `kl_loss` (every backend) with `reference.kl_loss`: value and gradient."""

import math

import pytest
import torch

import reference
from csd_kernels import KLLoss, kl_loss
from helpers import DEVICE, assert_close, assert_gradient, loss_and_grad
from test_csd_loss import make_logits


def check_kl_parity(student, teacher, backend, upstream=None, **kwargs):
    loss, grad = loss_and_grad(kl_loss, student, teacher, upstream, backend=backend, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "temperature_squared"}
    ref_loss, ref_grad = loss_and_grad(reference.kl_loss, student, teacher, upstream, **ref_kwargs)
    if kwargs.get("temperature_squared"):
        scale = kwargs["temperature"] ** 2
        ref_loss, ref_grad = ref_loss * scale, ref_grad * scale
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    assert_close(loss, ref_loss, dtype=torch.float32, name=f"{backend} KL")
    reference_fn = reference.kl_loss
    if kwargs.get("temperature_squared"):
        reference_fn = lambda *a, **k: reference.kl_loss(*a, **k) * kwargs["temperature"] ** 2  # noqa: E731
    assert_gradient(grad, ref_grad, reference_fn, student, teacher, upstream, name=f"{backend} KL gradient",
                    **ref_kwargs)
    return loss, grad


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
def test_kl_parity(backend, row_split, kind, temperature):
    student, teacher = make_logits()
    check_kl_parity(student, teacher, backend, kind=kind, temperature=temperature)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_parity_low_precision(backend, kind, dtype):
    student, teacher = make_logits(dtype=dtype)
    check_kl_parity(student, teacher, backend, kind=kind)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kl_masks_reductions_and_layouts(backend, kind, reduction):
    student, teacher = make_logits(lead=(3, 5), teacher_vocab=330)  # padded teacher vocabulary
    student, teacher = student[:, :-1], teacher[:, 1:]  # logits[:, :-1]-style strides
    labels = torch.randint(0, 301, (3, 4), device=DEVICE)
    labels[1, 2] = -100
    student[0, 0, :30] = -math.inf
    teacher[2, 1, 200:] = -math.inf
    upstream = torch.randn(3, 4, device=DEVICE) if reduction == "none" else None
    check_kl_parity(student, teacher, backend, upstream, kind=kind, labels=labels, reduction=reduction,
                    temperature=1.5)


def test_kl_num_items_in_batch_and_temperature_squared(backend):
    student, teacher = make_logits(lead=(6,))
    check_kl_parity(student, teacher, backend, temperature=2.0, temperature_squared=True,
                    num_items_in_batch=torch.tensor(4, device=DEVICE))


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kl_is_zero_for_equal_distributions(backend, kind):
    student, _ = make_logits(lead=(4,))
    loss = kl_loss(student, student + 3.0, kind=kind, backend=backend, reduction="none")
    assert loss.abs().max().item() < 1e-5


def test_kl_module_and_bad_kind(backend):
    student, teacher = make_logits(lead=(4,))
    module = KLLoss(kind="reverse", temperature=2.0, backend=backend)
    assert_close(module(student, teacher), kl_loss(student, teacher, kind="reverse", temperature=2.0,
                                                   backend=backend))
    with pytest.raises(ValueError, match="kind must be 'forward' or 'reverse', got 'js'"):
        kl_loss(student, teacher, kind="js")
    with pytest.raises(ValueError, match="kind must be"):
        KLLoss(kind="backward")
    with pytest.raises(TypeError, match="temperature_squared must be a bool"):
        kl_loss(student, teacher, temperature_squared="yes")
    with pytest.raises(ValueError, match="V_t=3 < V_s=301"):
        kl_loss(student, teacher[:, :3])
