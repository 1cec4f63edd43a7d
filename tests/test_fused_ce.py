"""The hard-label cross-entropy fused into the CSD pass, against reference CSD + F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

import reference
from csd_kernels import CSDLoss, csd_loss
from csd_kernels.contract import active_positions, reduce_rows
from helpers import DEVICE, assert_close, assert_gradient, loss_and_grad
from test_csd_loss import MIX, WEIGHTINGS, WEIGHTING_IDS, make_logits, spy_on_aligned


def reference_ce(student, labels, *, ignore_index=-100, mask=None, reduction="mean",
                 num_items_in_batch=None):
    """torch.nn.functional.cross_entropy in fp32 (float64 for float64 logits), with csd_loss's masking and
    denominators."""
    lead, vocab = student.shape[:-1], student.shape[-1]
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    active = active_positions(lead, student.device, labels, mask, ignore_index)
    # Excluded rows enter as zeros: autograd through F.cross_entropy of an all -inf row gives NaN even
    # where the row is ignored (softmax's backward, NaN * 0), where an excluded row's gradient is 0.
    student = torch.where(active.reshape(lead)[..., None], student.to(compute), 0.0)
    per_position = F.cross_entropy(student.reshape(-1, vocab), labels.reshape(-1),
                                   ignore_index=ignore_index, reduction="none")
    per_position = torch.where(active, per_position, 0.0)
    return reduce_rows(per_position, active, lead, reduction, num_items_in_batch)


def fused_reference(student, teacher, *, ce_weight, csd_weight=1.0, **kwargs):
    positions = {k: kwargs[k] for k in ("ignore_index", "mask", "reduction", "num_items_in_batch") if k in kwargs}
    return (csd_weight * reference.csd_loss(student, teacher, **kwargs)
            + ce_weight * reference_ce(student, kwargs["labels"], **positions))


def make_labels(lead, vocab=301, ignored=2):
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    labels.view(-1)[torch.randperm(labels.numel(), device=DEVICE)[:ignored]] = -100
    return labels


def check_fused(student, teacher, backend, upstream=None, **kwargs):
    loss, grad = loss_and_grad(csd_loss, student, teacher, upstream, backend=backend, **kwargs)
    ref_loss, ref_grad = loss_and_grad(fused_reference, student, teacher, upstream, **kwargs)
    assert_close(loss, ref_loss, dtype=torch.float32, name=f"{backend} CSD + CE")
    assert_gradient(grad, ref_grad, fused_reference, student, teacher, upstream,
                    name=f"{backend} CSD + CE gradient", **kwargs)


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=WEIGHTING_IDS)
def test_fused_parity_every_weighting(backend, row_split, weighting):
    student, teacher = make_logits()
    check_fused(student, teacher, backend, weighting=weighting, labels=make_labels((2, 3)),
                ce_weight=0.7, csd_weight=0.4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_temperature_reduction_and_mask(backend, temperature, reduction):
    """temperature != 1: the kernel tracks the temperature-1 normaliser of the cross-entropy too."""
    student, teacher = make_logits(lead=(3, 4))
    teacher[0, 0, 10:40] = -math.inf  # outside CSD's vocabulary for that row, but inside CE's
    mask = torch.rand(3, 4, device=DEVICE) > 0.25
    upstream = torch.randn(3, 4, device=DEVICE) if reduction == "none" else None
    check_fused(student, teacher, backend, upstream, weighting="ts", temperature=temperature,
                labels=make_labels((3, 4)), mask=mask, reduction=reduction, ce_weight=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision(backend, dtype):
    student, teacher = make_logits(dtype=dtype)
    check_fused(student, teacher, backend, labels=make_labels((2, 3)), ce_weight=0.5,
                num_items_in_batch=5)


@pytest.mark.parametrize("weighting", ["ss", "ts", MIX], ids=["ss", "ts", "mix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_parity_aligned_rows(monkeypatch, backend, row_split, weighting, dtype):
    """The fused CE in the forward's vectorised tile layout (`ALIGNED`: V a multiple of 16, fresh tensors),
    which the other CE tests (V = 301) never take; -inf runs in both, one of them over a label."""
    seen = spy_on_aligned(monkeypatch, backend)
    student, teacher = make_logits(lead=(5,), vocab=320, dtype=dtype)
    student[1, :150] = float("-inf")
    teacher[2, 40:200] = float("-inf")
    labels = make_labels((5,), vocab=320, ignored=1)
    labels[1] = 200  # a finite entry of row 1; row 2's label lies in the teacher's -inf run (the CE still counts it)
    labels[2] = 100
    check_fused(student, teacher, backend, weighting=weighting, labels=labels, ce_weight=0.6, csd_weight=0.8)
    if backend == "triton":
        assert seen and all(seen), f"the aligned layout was not taken: {seen}"


@pytest.mark.parametrize("weighting", ["ss", "ts", "us", MIX], ids=["ss", "ts", "us", "mix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw-forward", "exact-forward"])
def test_fused_ce_counts_the_blocks_before_the_first_valid_entry(monkeypatch, backend, row_split, weighting,
                                                                 dtype, raw):
    """The CE takes every finite student entry, also in the blocks before a row's first entry of CSD's
    vocabulary: a teacher -inf prefix longer than a block (128 here), a teacher all -inf, one valid
    entry at the end. The forwards' search for that first block once left those blocks out of the CE.
    Both Triton forwards: the raw one, and the exact one (its redo pass, the vocabulary-parallel partials)."""
    if backend == "triton":
        from csd_kernels.kernels import triton_backend

        monkeypatch.setattr(triton_backend, "RAW_FORWARD", raw)
    elif not raw:
        pytest.skip("one run of the torch backend is enough")
    student, teacher = make_logits(lead=(5,), dtype=dtype)
    teacher[0, :250] = float("-inf")
    teacher[1] = float("-inf")
    teacher[2, :-1] = float("-inf")
    teacher[3, :140] = float("-inf")
    student[3, :20] = float("-inf")
    labels = make_labels((5,), ignored=0)
    labels[3] = 30
    check_fused(student, teacher, backend, weighting=weighting, labels=labels, ce_weight=0.6, csd_weight=0.8)


def test_target_class_gradient_accurate_in_bf16(backend):
    """p - 1 at the label is formed in fp32: the bf16 gradient there is the rounded fp32 value."""
    student, teacher = make_logits(lead=(4,), dtype=torch.bfloat16)
    student[:, 5] += 6.0  # the label gets most of the mass: p - 1 is small and cancellation-prone
    labels = torch.full((4,), 5, device=DEVICE)
    _, grad = loss_and_grad(csd_loss, student, teacher, backend=backend, labels=labels, ce_weight=1.0,
                            csd_weight=0.0)
    _, exact = loss_and_grad(fused_reference, student.float(), teacher.float(), labels=labels,
                             ce_weight=1.0, csd_weight=0.0)
    rel = ((grad[:, 5].float() - exact[:, 5]) / exact[:, 5]).abs().max().item()
    assert rel < 1e-2, f"target-class gradient off by {rel:.3g} relative"


def test_return_components(backend):
    student, teacher = make_logits(lead=(2, 3))
    labels = make_labels((2, 3))
    total, csd, ce = csd_loss(student.requires_grad_(True), teacher, backend=backend, labels=labels,
                              ce_weight=0.3, csd_weight=2.0, return_components=True)
    assert total.requires_grad and not csd.requires_grad and not ce.requires_grad
    assert_close(csd, reference.csd_loss(student, teacher, labels=labels), name="csd component")
    assert_close(ce, reference_ce(student, labels), name="ce component")
    assert_close(total, 2.0 * csd + 0.3 * ce, name="total")
    _, csd_only, zero = csd_loss(student, teacher, backend=backend, return_components=True)
    assert zero.item() == 0.0
    assert_close(csd_only, reference.csd_loss(student, teacher), name="csd without CE")


def test_out_of_range_label_gives_nan_unless_validated(backend):
    student, teacher = make_logits(lead=(3,))
    labels = torch.tensor([4, 301, -100], device=DEVICE)  # 301 == V: out of range
    loss, grad = loss_and_grad(csd_loss, student, teacher, backend=backend, labels=labels,
                               ce_weight=1.0, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 301\).*\[301\]"):
        csd_loss(student, teacher, backend=backend, labels=labels, ce_weight=1.0, validate_labels=True)


def test_fused_ce_bad_input():
    student, teacher = make_logits(lead=(3,))
    with pytest.raises(ValueError, match="ce_weight=0.5 needs `labels`"):
        csd_loss(student, teacher, ce_weight=0.5)
    with pytest.raises(ValueError, match="ce_weight must be finite and >= 0, got -1.0"):
        csd_loss(student, teacher, ce_weight=-1.0)
    with pytest.raises(TypeError, match="csd_weight must be a Python real number"):
        csd_loss(student, teacher, csd_weight="1")
    with pytest.raises(TypeError, match="return_components must be a bool"):
        csd_loss(student, teacher, return_components=1)


def test_module_with_ce(backend):
    student, teacher = make_logits(lead=(2, 3))
    labels = make_labels((2, 3))
    module = CSDLoss(weighting=MIX, ce_weight=0.5, backend=backend)
    assert_close(module(student, teacher, labels=labels),
                 fused_reference(student, teacher, weighting=MIX, labels=labels, ce_weight=0.5))
