"""Parity of `csd_loss` (every backend) with `reference.csd_loss`: value and gradient.

Shapes are chosen on purpose: V = 301 or 1271 spans several 128-wide blocks with a ragged last one
(the `small_blocks` fixture), two leading dims exercise the row layout, and rows are few so the Triton
interpreter stays fast. The `row_split` fixture runs the Triton forward both with one program per row
and with each row split across programs.
"""

import math

import pytest
import torch

import reference
from csd_kernels import CSDLoss, csd_loss
from helpers import DEVICE, assert_close, assert_gradient, loss_and_grad

MIX = ({"teacher": 0.15, "student": 0.85}, {"teacher": 0.15, "student": 0.85})
ASYMMETRIC = ({"uniform": 0.3, "teacher": 0.7}, "student")
WEIGHTINGS = ["ss", "ts", "st", "us", "tt", "uu", MIX, ASYMMETRIC]
WEIGHTING_IDS = ["ss", "ts", "st", "us", "tt", "uu", "ts-mix", "asymmetric-mix"]


def make_logits(lead=(2, 3), vocab=301, dtype=torch.float32, teacher_vocab=None, teacher_dtype=None):
    """Student and correlated teacher logits, generated in fp32 and then cast (same values for all)."""
    student = 2.0 * torch.randn(*lead, vocab)
    teacher = torch.cat(
        [student + torch.randn_like(student), torch.randn(*lead, (teacher_vocab or vocab) - vocab)], dim=-1
    )
    return student.to(DEVICE, dtype), teacher.to(DEVICE, teacher_dtype or dtype)


def check_parity(student, teacher, backend, upstream=None, **kwargs):
    loss, grad = loss_and_grad(csd_loss, student, teacher, upstream, backend=backend, **kwargs)
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student, teacher, upstream, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    assert_close(loss, ref_loss, dtype=torch.float32, name=f"{backend} loss")
    assert_gradient(grad, ref_grad, reference.csd_loss, student, teacher, upstream, name=f"{backend} gradient",
                    **kwargs)
    return loss, grad


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=WEIGHTING_IDS)
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 0.5)], ids=["T=1", "T=2,0.5"])
def test_parity_every_weighting(backend, row_split, weighting, temperatures):
    student, teacher = make_logits()
    check_parity(student, teacher, backend, weighting=weighting, temperature=temperatures[0],
                 teacher_temperature=temperatures[1])


@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
     (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["bf16", "fp16", "fp32-student-bf16-teacher", "bf16-student-fp32-teacher"],
)
@pytest.mark.parametrize("weighting", ["ss", "ts", "us"])
def test_parity_dtypes(backend, dtypes, weighting):
    student, teacher = make_logits(dtype=dtypes[0], teacher_dtype=dtypes[1])
    check_parity(student, teacher, backend, weighting=weighting)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("positions", ["all", "labels", "mask", "labels-and-mask"])
def test_parity_reductions_and_masks(backend, reduction, positions):
    student, teacher = make_logits(lead=(3, 4))
    labels = torch.randint(0, 301, (3, 4), device=DEVICE)
    labels[0, 1] = labels[2, 3] = labels[1, 0] = -100
    mask = torch.rand(3, 4, device=DEVICE) > 0.3
    kwargs = {"labels": labels if "labels" in positions else None,
              "mask": mask if "mask" in positions else None}
    upstream = torch.randn(3, 4, device=DEVICE) if reduction == "none" else None
    loss, grad = check_parity(student, teacher, backend, upstream, weighting="ts", reduction=reduction,
                              **kwargs)
    excluded = torch.zeros(3, 4, dtype=torch.bool, device=DEVICE)
    if kwargs["labels"] is not None:
        excluded |= labels == -100
    if kwargs["mask"] is not None:
        excluded |= ~mask
    assert bool((grad[excluded] == 0).all()), "excluded positions must get exactly zero gradient"
    if reduction == "none":
        assert bool((loss[excluded] == 0).all())


@pytest.mark.parametrize("num_items", [7, "tensor"])
def test_num_items_in_batch_replaces_the_mean_denominator(backend, num_items):
    student, teacher = make_logits(lead=(3, 4))
    labels = torch.randint(0, 301, (3, 4), device=DEVICE)
    labels[0] = -100
    value = torch.tensor(7, device=DEVICE) if num_items == "tensor" else num_items
    loss, grad = check_parity(student, teacher, backend, labels=labels, num_items_in_batch=value)
    total, total_grad = loss_and_grad(csd_loss, student, teacher, backend=backend, labels=labels,
                                      reduction="sum")
    assert_close(loss, total / 7, name="mean with num_items_in_batch")
    assert_close(grad, total_grad / 7, name="gradient with num_items_in_batch")


def test_expanded_upstream_gradient(backend):
    """reduction="none" with a stride-0 upstream gradient (what autograd passes for .sum())."""
    student, teacher = make_logits(lead=(5,))
    upstream = torch.full((1,), 0.37, device=DEVICE).expand(5)
    check_parity(student, teacher, backend, upstream, reduction="none", weighting="us")


@pytest.mark.parametrize("ce", [False, True], ids=["csd", "csd+ce"])
@pytest.mark.parametrize("weighting", ["ts", "us"])
def test_non_finite_upstream_gradient_reaches_every_entry(small_blocks, weighting, ce):
    """A NaN or inf upstream gradient of a row reaches all of its entries, masked ones too (NaN * 0),
    as `upstream * dloss/ds` does: the Triton kernel, which folds the upstream into one factor per row,
    gives the PyTorch backend's pattern exactly, and a finite row stays finite."""
    student, teacher = make_logits(lead=(3,), vocab=300)
    teacher[:, :5] = -math.inf
    student[:, 5:8] = -math.inf
    upstream = torch.tensor([math.nan, math.inf, 2.0], device=DEVICE)
    labels = torch.tensor([10, 200, 7], device=DEVICE) if ce else None
    grads = {}
    for backend in ("torch", "triton"):
        _, grads[backend] = loss_and_grad(csd_loss, student, teacher, upstream, backend=backend,
                                          weighting=weighting, reduction="none", labels=labels)
    torch_grad, triton_grad = grads["torch"], grads["triton"]
    assert torch.isnan(triton_grad[0]).all(), "a NaN upstream must reach every entry of its row"
    assert torch.equal(torch.isnan(triton_grad), torch.isnan(torch_grad))
    assert torch.equal(torch.isinf(triton_grad), torch.isinf(torch_grad))
    assert torch.isfinite(triton_grad[2]).all()


@pytest.mark.parametrize(
    "layout", ["sliced-positions", "padded-teacher", "strided-vocab", "non-collapsible", "size-one-dims"]
)
def test_parity_strided_inputs(backend, row_split, layout):
    if layout == "sliced-positions":  # logits[:, :-1]: leading dims collapse into two strides
        student, teacher = make_logits(lead=(2, 5))
        student, teacher = student[:, :-1], teacher[:, 1:]
    elif layout == "padded-teacher":  # V_t > V_s: the extra teacher columns must be ignored
        student, teacher = make_logits(lead=(2, 3), teacher_vocab=320)
        teacher[..., 301:] = 1e4
    elif layout == "strided-vocab":  # vocabulary dimension not contiguous
        student, teacher = make_logits(lead=(4,))
        student = student.t().contiguous().t()
        teacher = teacher[:, ::1].t().contiguous().t()
    elif layout == "non-collapsible":  # three leading strides: the Triton launcher copies
        student, teacher = make_logits(lead=(3, 3, 4))
        student, teacher = student[:, :2, 1:], teacher[:, 1:, :3]
    else:
        student, teacher = make_logits(lead=(1, 4, 1))
    assert student.shape == teacher[..., : student.shape[-1]].shape
    check_parity(student, teacher, backend, weighting="ts")


def test_parity_several_default_blocks_per_row(row_split):
    """The real block heuristic (no `small_blocks`): V = 9000 spans several default-size blocks."""
    student, teacher = make_logits(lead=(3,), vocab=9000)
    check_parity(student, teacher, "triton", weighting=MIX)


def test_masked_vocabulary_entries(backend, row_split):
    student, teacher = make_logits(lead=(6,))
    student[0, :40] = -math.inf  # masked in the student
    teacher[1, 100:260] = -math.inf  # masked in the teacher only
    student[2, ::2] = -math.inf
    teacher[2, 1::2] = -math.inf  # every entry of row 2 masked on one side: an empty row
    student[3, 1:] = -math.inf  # a single valid entry
    loss, grad = check_parity(student, teacher, backend, weighting="ts", reduction="none")
    valid = (student != -math.inf) & (teacher != -math.inf)
    assert bool((grad[~valid] == 0).all()), "masked vocabulary entries must get zero gradient"
    assert loss[2].item() == 0.0 and loss[3].item() == 0.0
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_uniform_counts_only_valid_entries(backend):
    """With U, masking half a row must equal dropping those columns."""
    student, teacher = make_logits(lead=(2,), vocab=300)
    masked = teacher.clone()
    masked[:, 150:] = -math.inf
    kept = csd_loss(student, masked, weighting="uu", backend=backend)
    dropped = csd_loss(student[:, :150].contiguous(), teacher[:, :150].contiguous(), weighting="uu",
                       backend=backend)
    assert_close(kept, dropped, name="uniform over valid entries")


@pytest.mark.parametrize("case", ["empty-batch", "all-excluded"])
def test_nothing_to_count_gives_exact_zero(backend, case):
    if case == "empty-batch":
        student, teacher = make_logits(lead=(0, 3))
        kwargs = {}
    else:
        student, teacher = make_logits(lead=(2, 3))
        kwargs = {"labels": torch.full((2, 3), -100, device=DEVICE)}
    for reduction in ("mean", "sum"):
        loss, grad = loss_and_grad(csd_loss, student, teacher, backend=backend, reduction=reduction,
                                   **kwargs)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert bool((grad == 0).all())


def test_vocabulary_of_one_gives_zero(backend):
    student, teacher = make_logits(lead=(4,), vocab=1)
    loss, grad = loss_and_grad(csd_loss, student, teacher, backend=backend, weighting="ts")
    assert loss.item() == 0.0 and bool((grad == 0).all())


def test_nan_propagates(backend):
    student, teacher = make_logits(lead=(3,))
    student[1, 7] = math.nan
    loss = csd_loss(student, teacher, backend=backend, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(csd_loss(student, teacher, backend=backend))
    # An excluded position is never read, so its NaN does not reach the loss.
    mask = torch.tensor([True, False, True], device=DEVICE)
    assert torch.isfinite(csd_loss(student, teacher, backend=backend, mask=mask))


@pytest.mark.parametrize("weighting", ["ss", "ts", "us"])
def test_shift_invariance_with_large_offsets(backend, row_split, weighting):
    """Adding 1e3 to a row of s or t changes nothing; the per-row shift keeps fp32 accurate."""
    student, teacher = make_logits(lead=(4,))
    base_loss, base_grad = loss_and_grad(csd_loss, student, teacher, backend=backend, weighting=weighting)
    offsets = torch.tensor([1e3, -1e3, 0.0, 5e2], device=DEVICE)[:, None]
    loss, grad = loss_and_grad(csd_loss, student + offsets, teacher - 2 * offsets, backend=backend,
                               weighting=weighting)
    # fp32 carries ~1e3 * 6e-8 = 6e-5 absolute error per logit after the offset: compare with that.
    assert abs(loss.item() - base_loss.item()) <= 1e-4 * max(1.0, base_loss.item())
    assert (grad - base_grad).abs().max().item() <= 1e-4 * base_grad.abs().max().item() + 1e-6


def test_inplace_backward(backend):
    student, teacher = make_logits(lead=(2, 3), dtype=torch.bfloat16)
    expected_loss, expected_grad = loss_and_grad(csd_loss, student, teacher, backend=backend)
    leaf = student.detach().clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, like the output of an lm_head
    loss = csd_loss(logits, teacher, backend=backend, inplace_backward=True)
    version = logits._version
    loss.backward()
    assert logits._version > version, "the in-place backward must bump the logits' version counter"
    assert_close(leaf.grad, expected_grad, name="in-place gradient")
    assert_close(logits.detach(), expected_grad, name="logits storage now holds the gradient")


def test_inplace_backward_misuse_is_caught(backend):
    student, teacher = make_logits(lead=(4,))
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1.0
    other = (logits**2).sum()  # saves `logits` for its backward
    loss = csd_loss(logits, teacher, backend=backend, inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_deterministic(backend, row_split):
    student, teacher = make_logits(lead=(2, 3))
    first = loss_and_grad(csd_loss, student, teacher, backend=backend, weighting=MIX)
    second = loss_and_grad(csd_loss, student, teacher, backend=backend, weighting=MIX)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_teacher_gets_no_gradient(backend):
    student, teacher = make_logits(lead=(3,))
    teacher.requires_grad_(True)
    loss = csd_loss(student.requires_grad_(True), teacher, backend=backend)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_module_matches_function(backend):
    student, teacher = make_logits(lead=(2, 3))
    labels = torch.randint(0, 301, (2, 3), device=DEVICE)
    labels[1, 1] = -100
    module = CSDLoss(weighting="ts", temperature=2.0, backend=backend)
    assert "weighting='ts'" in repr(module)
    assert_close(module(student, teacher, labels=labels),
                 csd_loss(student, teacher, weighting="ts", temperature=2.0, backend=backend, labels=labels))


def test_auto_backend_on_this_device():
    student, teacher = make_logits(lead=(3,))
    assert_close(csd_loss(student, teacher), reference.csd_loss(student, teacher))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large_shape_int64_offsets(dtype):
    """N x V above 2^31 elements: row offsets must not overflow int32."""
    n, vocab = 16384, 151936
    student = torch.randn(n, vocab, device="cuda", dtype=dtype)
    teacher = torch.randn(n, vocab, device="cuda", dtype=dtype)
    student[-1] += 3.0  # make the last row differ, so a wrapped offset would show
    loss = csd_loss(student, teacher, reduction="none", backend="triton")
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    expected = reference.csd_loss(student[rows], teacher[rows], reduction="none")
    assert_close(loss[rows], expected, dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_bit_identical_runs():
    student, teacher = make_logits(lead=(256,), vocab=151936, dtype=torch.bfloat16)
    first = loss_and_grad(csd_loss, student, teacher, backend="triton", weighting="ts")
    second = loss_and_grad(csd_loss, student, teacher, backend="triton", weighting="ts")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def spy_on_aligned(monkeypatch, backend):
    """The list of the Triton forward's ALIGNED decisions, one per launch (empty for other backends).
    (The backward asks too, of s, t and the gradient: not recorded.)"""
    seen = []
    if backend == "triton":
        from csd_kernels.kernels import triton_backend

        aligned = triton_backend._aligned

        def spy(tensors, strides):
            result = aligned(tensors, strides)
            if len(tensors) == 2:
                seen.append(result)
            return result

        monkeypatch.setattr(triton_backend, "_aligned", spy)
    return seen


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=WEIGHTING_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_aligned_rows(monkeypatch, backend, row_split, weighting, dtype):
    """Rows that start 16-byte aligned (V a multiple of 16, fresh tensors) take the forward's vectorised
    tile layout (`ALIGNED`; bf16 rows, V even, as 32-bit words: `WORDS`), the one real GPU launches
    mostly run; V = 301 elsewhere takes the other.
    With -inf runs in the student and in the teacher."""
    seen = spy_on_aligned(monkeypatch, backend)
    student, teacher = make_logits(lead=(5,), vocab=320, dtype=dtype)
    student[1, :150] = float("-inf")
    teacher[2, 40:200] = float("-inf")
    check_parity(student, teacher, backend, weighting=weighting, temperature=1.5)
    if backend == "triton":
        assert seen and all(seen), f"the aligned layout was not taken: {seen}"


@pytest.mark.parametrize("weighting", ["ss", "ts", "us"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_aligned_slice_of_a_padded_vocabulary(monkeypatch, backend, row_split, weighting, dtype):
    """logits[..., :306] of rows padded to 320: aligned rows whose end is not a multiple of 8 entries, so
    the last block's range mask falls inside a 16-byte run (for bf16, between 32-bit words of the
    `WORDS` loads). The padding holds huge values that must never be read."""
    seen = spy_on_aligned(monkeypatch, backend)
    full_s, full_t = make_logits(lead=(4,), vocab=320, dtype=dtype)
    full_s[..., 306:] = 1e4
    full_t[..., 306:] = -1e4
    full_s[2, :100] = float("-inf")
    full_s = full_s.detach().requires_grad_(True)
    student, teacher = full_s[..., :306], full_t[..., :306]
    loss = csd_loss(student, teacher, backend=backend, weighting=weighting, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), full_s)
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.detach(), teacher, weighting=weighting,
                                       reduction="none")
    assert_close(loss, ref_loss, dtype=torch.float32, name=f"{backend} loss")
    assert_gradient(grad[..., :306], ref_grad, reference.csd_loss, student.detach(), teacher,
                    name=f"{backend} gradient", weighting=weighting, reduction="none")
    assert not grad[..., 306:].any(), "the padding got a gradient"
    if backend == "triton":
        assert seen and all(seen), f"the aligned layout was not taken: {seen}"
