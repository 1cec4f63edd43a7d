"""Top-k teachers: `topk_csd_loss`, `topk_kl_loss` and `teacher_topk` against `reference/topk.py`.

The reference builds each row's coarsened vocabulary and calls the dense reference, in float64 from the
same inputs; every backend (Triton under the interpreter on CPU, the chunked PyTorch pass, and the
compiled CPU pass where a C++ compiler exists) must match its value and gradient.
Classes of input: padded and all-padded rows, K = 1 and K = V, teacher tails of zero and of tiny mass,
students with almost no mass off the support (the Triton pass's exact fallback) or with a maximum far
above the support (its re-shifted pass), -inf and NaN logits, ids >= V, every weighting, temperatures,
labels / mask / reductions / num_items_in_batch, the fused cross-entropy, strided students, every
integer dtype of ids and the storage dtypes of logprobs.
"""

import math

import pytest
import torch

import reference
from csd_kernels import teacher_topk, topk_csd_loss, topk_kl_loss
from csd_kernels.contract import WEIGHTING_CODES
from helpers import DEVICE, assert_close, assert_close_lowp

# The compiled CPU student pass (issue 17) runs the cases that reach the student pass differently:
# row classes, the tail's exactness, NaN and ids >= V, the cross-entropy's label term, layouts, dtypes
# and the operators. Weightings, temperatures, reductions and the KL kinds only change the dense loss on
# the coarsened rows, which is the same code whatever the student pass (tested with the other two).
INDUCTOR_TESTS = {"test_row_classes", "test_student_tail_of_tiny_mass_is_exact",
                  "test_student_maximum_far_above_the_support",
                  "test_nan_and_out_of_range_ids_poison_only_their_positions", "test_fused_cross_entropy",
                  "test_strided_students", "test_student_dtypes", "test_narrow_id_dtypes_with_a_large_vocabulary",
                  "test_opcheck_topk_ops", "test_compiled_topk_step_matches_eager"}


@pytest.fixture(params=["torch", "triton", "inductor"])
def backend(request, small_blocks):
    if request.param == "inductor":
        from csd_kernels.kernels import inductor_backend

        if request.function.__name__ == "test_no_host_sync":
            pytest.skip("a CPU-only backend: no device to synchronise with (it reads CPU tensors to pick "
                        "the rows for its exact pass)")
        if request.function.__name__ not in INDUCTOR_TESTS:
            pytest.skip("the student pass is not what this case varies (see INDUCTOR_TESTS)")
        if DEVICE.type != "cpu" or not inductor_backend.available():
            pytest.skip("the compiled CPU backend runs on CPU tensors with a C++ compiler")
    return request.param


LEAD = (3, 4)
VOCAB = 301  # with the small_blocks fixture: three Triton blocks and four torch chunks per row
MIX = ({"student": 0.6, "teacher": 0.3, "uniform": 0.1}, {"teacher": 0.5, "student": 0.5})


def _teacher(student, k, *, pattern="plain"):
    """(ids int64, logprobs float32) of a teacher correlated with `student`, in one of the patterns."""
    lead, vocab = student.shape[:-1], student.shape[-1]
    teacher = student.detach().float() + torch.randn(*lead, vocab, device=student.device)
    ids, logprobs = reference.teacher_topk(teacher, k)
    if pattern == "padded":  # ragged rows: padding by id < 0, by logprob -inf, and an all-padded row
        ids[..., -1] = -1
        logprobs[0, 0, 1:3] = -math.inf
        ids[1, 2] = -7
        logprobs[2, 1] = -math.inf
    elif pattern == "zero-tail":  # the support holds all the mass: no teacher tail bucket
        logprobs = torch.log_softmax(logprobs, dim=-1)
    elif pattern == "tiny-tail":  # 1e-9 of the teacher's mass off the support
        logprobs = torch.log_softmax(logprobs.double(), dim=-1) + math.log1p(-1e-9)
    return ids, logprobs.float()


def _student(lead=LEAD, vocab=VOCAB, dtype=torch.float32, pattern="plain"):
    student = 2.0 * torch.randn(*lead, vocab, device=DEVICE)
    if pattern == "inf":  # -inf entries: a run at the start, scattered ones, a row that is almost all -inf
        student[..., :5] = -math.inf
        student[0, 1, ::7] = -math.inf
        student[1, 1, 8:] = -math.inf
    return student.to(dtype)


def _check(fn_fast, fn_ref, student, ids, logprobs, *, upstream=None, **kwargs):
    """Value and gradient of the fast path against the reference (float64, same inputs); bf16/fp16
    gradients by the low-precision criterion against the plain reference in the student's dtype."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn_fast(s, ids, logprobs, **kwargs)
    up = torch.ones_like(loss) if upstream is None else upstream
    (grad,) = torch.autograd.grad(loss, s, up)
    s64 = student.detach().double().requires_grad_(True)
    ref = fn_ref(s64, ids, logprobs, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, s64, up.double())
    assert_close(loss, ref.to(loss.dtype), name="loss")
    if student.dtype in (torch.bfloat16, torch.float16):
        s_low = student.detach().clone().requires_grad_(True)
        (naive,) = torch.autograd.grad(fn_ref(s_low, ids, logprobs, **kwargs), s_low, up)
        assert_close_lowp(grad, ref_grad, naive, name="gradient")
    else:
        assert_close(grad, ref_grad.to(grad.dtype), name="gradient")
    return loss, grad


# ----------------------------------------------------------------------------------------------------
# parity: weightings, tail, temperatures
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
@pytest.mark.parametrize("weighting", list(WEIGHTING_CODES) + [MIX], ids=list(WEIGHTING_CODES) + ["mix"])
def test_every_weighting(backend, weighting, tail):
    student = _student()
    ids, logprobs = _teacher(student, 16)
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting=weighting, tail=tail,
           backend=backend)


@pytest.mark.parametrize("temperatures", [(2.0, 1.0), (0.5, 3.0), (1.0, 0.25)])
def test_temperatures(backend, temperatures):
    student = _student()
    ids, logprobs = _teacher(student, 8)
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting="ts",
           temperature=temperatures[0], teacher_temperature=temperatures[1], backend=backend)


# ----------------------------------------------------------------------------------------------------
# classes of rows
# ----------------------------------------------------------------------------------------------------
ROW_CASES = {
    # name: (k, teacher pattern, student pattern)
    "padded": (16, "padded", "plain"),
    "k=1": (1, "plain", "plain"),
    "k=V": (VOCAB, "plain", "plain"),
    "zero-tail": (8, "zero-tail", "plain"),
    "tiny-tail": (8, "tiny-tail", "plain"),
    "inf-student": (12, "plain", "inf"),
}


# Every weighting is covered above; the row classes run with "ts" (both softmax bases) and, for the
# classes that change the row's size (padding, K = 1, K = V), with "uu" (the entry count) too.
ROW_WEIGHTINGS = [(case, "ts") for case in ROW_CASES] + [(case, "uu") for case in ("padded", "k=1", "k=V")]


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
@pytest.mark.parametrize("case,weighting", ROW_WEIGHTINGS, ids=[f"{c}-{w}" for c, w in ROW_WEIGHTINGS])
def test_row_classes(backend, case, weighting, tail):
    k, teacher_pattern, student_pattern = ROW_CASES[case]
    student = _student(pattern=student_pattern)
    ids, logprobs = _teacher(student, k, pattern=teacher_pattern)
    loss, grad = _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting=weighting,
                        tail=tail, backend=backend, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def _dominant_support(offset):
    """A student whose support logits lie `offset` above every other entry (a tail mass of about
    (V - K) e^-offset): the Triton pass's subtraction would lose digits, so it takes the exact pass."""
    student = _student()
    ids, logprobs = _teacher(student, 8)
    boost = torch.zeros_like(student).scatter_(-1, ids, offset)
    return student + boost, ids, logprobs


@pytest.mark.parametrize("offset", [5.0, 20.0, 30.0, 40.0, 120.0], ids=["5", "20", "30", "40", "120"])
def test_student_tail_of_tiny_mass_is_exact(backend, offset):
    student, ids, logprobs = _dominant_support(offset)
    loss, _ = _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting="ts",
                     backend=backend, reduction="none")
    # The tail's loss term is large (d_tail is far from E_T[d]) and finite: a tail lost to cancellation
    # (or rounded to -inf, which drops the bucket) would change it.
    assert torch.isfinite(loss).all()


def test_student_maximum_far_above_the_support(backend):
    """Entries 100 above the support's maximum: exp(s - r) would overflow fp32 at the fixed reference."""
    student = _student()
    ids, logprobs = _teacher(student, 8)
    student[..., 0] = 100.0
    student[0, 0, ids[0, 0]] = -90.0  # and a support far below the rest
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting="ts", backend=backend)


def test_nan_and_out_of_range_ids_poison_only_their_positions(backend):
    student = _student()
    ids, logprobs = _teacher(student, 8)
    student[0, 1, 3] = math.nan  # a NaN logit (on or off the support)
    ids[2, 0, 4] = VOCAB + 5  # an id >= V
    loss = topk_csd_loss(student, ids, logprobs, reduction="none", backend=backend)
    ref = reference.topk_csd_loss(student.double(), ids, logprobs, reduction="none")
    assert_close(loss, ref.float(), name="loss")
    assert torch.isnan(loss[0, 1]) and torch.isnan(loss[2, 0])
    assert torch.isfinite(loss[1]).all()


# ----------------------------------------------------------------------------------------------------
# labels, mask, reductions, cross-entropy, KL
# ----------------------------------------------------------------------------------------------------
def _labels():
    labels = torch.randint(0, VOCAB, LEAD, device=DEVICE)
    labels[0, 1] = labels[2, 3] = -100
    return labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_mask_reductions(backend, reduction):
    student = _student()
    ids, logprobs = _teacher(student, 8, pattern="padded")
    mask = torch.rand(LEAD, device=DEVICE) > 0.3
    upstream = torch.randn(LEAD, device=DEVICE) if reduction == "none" else None
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, labels=_labels(), mask=mask,
           reduction=reduction, backend=backend, upstream=upstream)


@pytest.mark.parametrize("num_items", [7, "tensor"])
def test_num_items_in_batch(backend, num_items):
    student = _student()
    ids, logprobs = _teacher(student, 8)
    num_items = torch.tensor(7.0, device=DEVICE) if num_items == "tensor" else num_items
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, labels=_labels(),
           num_items_in_batch=num_items, backend=backend)


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
def test_fused_cross_entropy(backend, tail):
    """CE over the student's full vocabulary; labels on and off the support, and out of range."""
    student = _student(pattern="inf")
    ids, logprobs = _teacher(student, 8, pattern="padded")
    labels = _labels()
    labels[1, 0] = ids[1, 0, 2]  # a label on the support
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, labels=labels, ce_weight=0.7,
           csd_weight=0.4, tail=tail, weighting="st", backend=backend)
    total, csd, ce = topk_csd_loss(student, ids, logprobs, labels=labels, ce_weight=0.7, csd_weight=0.4,
                                   tail=tail, backend=backend, return_components=True)
    ref = reference.topk_csd_loss(student.double(), ids, logprobs, labels=labels, ce_weight=0.7, csd_weight=0.4,
                                  tail=tail, return_components=True)
    for got, want, name in zip((total, csd, ce), ref, ("total", "csd", "ce")):
        assert_close(got, want.float(), name=name)
    assert not csd.requires_grad and not ce.requires_grad
    labels[0, 0] = VOCAB  # out of range: that position's CE is NaN
    per_position = topk_csd_loss(student, ids, logprobs, labels=labels, ce_weight=1.0, reduction="none",
                                 backend=backend)
    assert torch.isnan(per_position[0, 0]) and not torch.isnan(per_position[1:]).any()


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_topk_kl(backend, kind, tail):
    student = _student(pattern="inf")
    ids, logprobs = _teacher(student, 8, pattern="padded")
    _check(topk_kl_loss, reference.topk_kl_loss, student, ids, logprobs, kind=kind, tail=tail, temperature=1.5,
           labels=_labels(), backend=backend)


def test_topk_kl_is_kl_of_the_coarsened_distributions():
    """With the tail, the coarsened teacher sums to one: topk KL is an honest KL, >= 0, and 0 when the
    student equals the teacher; and it never exceeds the full-vocabulary KL (coarsening loses information)."""
    teacher = 2.0 * torch.randn(*LEAD, VOCAB, device=DEVICE)
    ids, logprobs = teacher_topk(teacher, 8)
    same = topk_kl_loss(teacher, ids, logprobs, reduction="none", backend="torch")
    assert same.abs().max() < 1e-5
    student = _student()
    coarse = topk_kl_loss(student, ids, logprobs, reduction="none", backend="torch")
    full = reference.kl_loss(student, teacher, reduction="none")
    assert (coarse >= -1e-6).all() and (coarse <= full + 1e-5).all()


# ----------------------------------------------------------------------------------------------------
# layouts and dtypes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sliced", "transposed", "broadcast", "vocab-strided"])
def test_strided_students(backend, layout):
    base = _student(lead=(3, 5))
    if layout == "sliced":  # logits[:, :-1]
        student = base[:, :-1]
    elif layout == "transposed":
        student = base.transpose(0, 1).contiguous().transpose(0, 1)[:, :4]
    elif layout == "broadcast":
        student = base[:1, :4].expand(3, 4, VOCAB)
    else:
        student = torch.stack([base[:, :4], base[:, :4]], dim=-1)[..., 0]
    ids, logprobs = _teacher(student, 8)
    ids, logprobs = ids.transpose(0, 1).contiguous().transpose(0, 1), logprobs[..., :]
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting="ts", backend=backend)


STORAGE = [(ids, torch.float32) for ids in (torch.int32, torch.int64, torch.int16, torch.uint8)] + [
    (torch.int32, torch.float16), (torch.int32, torch.bfloat16)]


@pytest.mark.parametrize("ids_dtype,logprobs_dtype", STORAGE, ids=[f"{str(i)[6:]}-{str(p)[6:]}" for i, p in STORAGE])
def test_storage_dtypes(backend, ids_dtype, logprobs_dtype):
    student = _student(vocab=251)  # uint8 ids hold < 256
    ids, logprobs = _teacher(student, 8, pattern="padded" if ids_dtype != torch.uint8 else "plain")
    _check(topk_csd_loss, reference.topk_csd_loss, student, ids.to(ids_dtype), logprobs.to(logprobs_dtype),
           weighting="ts", backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_student_dtypes(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels take fp32/bf16/fp16 (csd_loss contract)")
    student = _student(dtype=dtype)
    ids, logprobs = _teacher(student, 8, pattern="padded")
    loss, grad = _check(topk_csd_loss, reference.topk_csd_loss, student, ids, logprobs, weighting="ts",
                        labels=_labels(), ce_weight=0.5, backend=backend)
    assert grad.dtype == dtype and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_narrow_id_dtypes_with_a_large_vocabulary(backend):
    """uint8/int16 ids index the first 256/32768 entries of a larger vocabulary: no overflow anywhere."""
    student = _student(vocab=40000, lead=(2,))
    ids, logprobs = _teacher(student, 4)
    ids = torch.stack([torch.randperm(256)[:4] for _ in range(2)]).to(DEVICE)  # distinct ids per row
    for dtype in (torch.uint8, torch.int16):
        got = topk_csd_loss(student, ids.to(dtype), logprobs, tail=False, backend=backend)
        want = reference.topk_csd_loss(student.double(), ids, logprobs, tail=False)
        assert_close(got, want.float(), name=f"loss with {dtype} ids")


def test_backends_agree_bitwise_on_the_support_gather():
    """Without the tail or CE the forward reads only the support: every backend returns the same loss."""
    student = _student()
    ids, logprobs = _teacher(student, 8)
    a = topk_csd_loss(student, ids, logprobs, tail=False, backend="torch")
    b = topk_csd_loss(student, ids, logprobs, tail=False, backend="triton")
    assert_close(a, b, name="loss")


# ----------------------------------------------------------------------------------------------------
# teacher_topk
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_topk(temperature, dtype, monkeypatch):
    import csd_kernels.topk as topk_module

    monkeypatch.setattr(topk_module, "_TOPK_CHUNK_ELEMENTS", 3 * VOCAB)  # several chunks of rows
    teacher = (3.0 * torch.randn(5, 7, VOCAB, device=DEVICE)).to(dtype)[:, 1:]  # strided, sliced
    ids, logprobs = teacher_topk(teacher, 16, temperature=temperature)
    want = torch.log_softmax(teacher.float() / temperature, dim=-1).topk(16, dim=-1)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32 and ids.shape == (5, 6, 16)
    assert_close(logprobs, want.values, name="logprobs")
    # The same ids (ties aside): each returned id's logprob is the returned value.
    full = torch.log_softmax(teacher.float() / temperature, dim=-1)
    assert_close(full.gather(-1, ids), logprobs, name="logprob at the returned ids")
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()


def test_teacher_topk_k_equal_vocab_is_the_full_distribution():
    teacher = torch.randn(4, 33)
    ids, logprobs = teacher_topk(teacher, 33)
    assert_close(logprobs.exp().sum(-1), torch.ones(4), name="mass")
    assert (ids.sort(-1).values == torch.arange(33)).all()


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_any_work():
    student = _student()
    ids, logprobs = _teacher(student, 8)
    cases = [
        (dict(teacher_ids=ids.float()), TypeError, "teacher_ids must be an integer tensor"),
        (dict(teacher_ids=ids.bool()), TypeError, "teacher_ids must be an integer tensor"),
        (dict(teacher_logprobs=logprobs.long()), TypeError, "teacher_logprobs must be a floating tensor"),
        (dict(teacher_logprobs=logprobs[..., :4]), ValueError, "same shape"),
        (dict(teacher_ids=ids[:2], teacher_logprobs=logprobs[:2]), ValueError, "leading shape"),
        (dict(teacher_ids=ids[..., :0], teacher_logprobs=logprobs[..., :0]), ValueError, "K >= 1"),
        (dict(teacher_ids=ids.tolist()), TypeError, "teacher_ids must be a torch.Tensor"),
        (dict(tail=1), TypeError, "tail must be a bool"),
        (dict(weighting="xy"), ValueError, "unknown code"),
        (dict(ce_weight=0.5), ValueError, "needs `labels`"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels must have the logits' leading shape"),
        (dict(mask=torch.ones(LEAD, dtype=torch.long)), TypeError, "mask must be a bool tensor"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(validate_ids="yes"), TypeError, "validate_ids must be a bool"),
    ]
    for change, error, message in cases:
        kwargs = dict(teacher_ids=ids, teacher_logprobs=logprobs)
        kwargs.update(change)
        with pytest.raises(error, match=message):
            topk_csd_loss(student, kwargs.pop("teacher_ids"), kwargs.pop("teacher_logprobs"), **kwargs)
    with pytest.raises(ValueError, match="kind must be"):
        topk_kl_loss(student, ids, logprobs, kind="sideways")
    with pytest.raises(ValueError, match=r"k must lie in \[1, V\] = \[1, 301\], got 0"):
        teacher_topk(student, 0)
    with pytest.raises(ValueError, match="got 302"):
        teacher_topk(student, VOCAB + 1)
    with pytest.raises(TypeError, match="k must be an int"):
        teacher_topk(student, 2.0)


def test_validate_ids():
    student = _student()
    ids, logprobs = _teacher(student, 8, pattern="padded")
    topk_csd_loss(student, ids, logprobs, validate_ids=True)  # padding is fine
    bad = ids.clone()
    bad[1, 1, 0] = VOCAB
    with pytest.raises(ValueError, match=r"teacher_ids must be < V = 301.*\[301\]"):
        topk_csd_loss(student, bad, logprobs, validate_ids=True)
    repeated = ids.clone()
    repeated[2, 2, 3] = repeated[2, 2, 0]
    with pytest.raises(ValueError, match=f"repeats id {int(ids[2, 2, 0])} in position 10"):
        topk_csd_loss(student, repeated, logprobs, validate_ids=True)
    padded_twice = ids.clone()
    padded_twice[0, 0, :3] = -1  # repeated padding is not a duplicate
    topk_csd_loss(student, padded_twice, logprobs, validate_ids=True)


# ----------------------------------------------------------------------------------------------------
# operators: opcheck, torch.compile, no host sync
# ----------------------------------------------------------------------------------------------------
def _op_args(backend, labels=True):
    student = _student(lead=(5,))
    ids, logprobs = _teacher(student, 6)
    ids = ids.to(torch.int32)
    ids[1, 2] = -1
    active = torch.tensor([True, True, False, True, True], device=DEVICE)
    row_labels = torch.randint(0, VOCAB, (5,), device=DEVICE) if labels else None
    return student.requires_grad_(True), ids, active, row_labels


@pytest.mark.parametrize("stream", [True, False])
def test_opcheck_topk_ops(backend, stream):
    from csd_kernels.ops import topk_student, topk_student_backward

    student, ids, active, labels = _op_args(backend)
    torch.library.opcheck(topk_student, (student, ids, active, labels, stream, backend))
    support, tail, lse, _ = (x.detach() for x in topk_student(student, ids, active, labels, stream, backend))
    grads = [torch.randn_like(x) for x in (support, tail, lse, tail)]
    torch.library.opcheck(topk_student_backward, (student.detach(), ids, active, labels, support, tail, lse,
                                                  *grads, stream, backend))


@pytest.mark.slow
def test_compiled_topk_step_matches_eager(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(s, ids, logprobs, labels):
        s = torch.tanh(s) * 4.0
        return (topk_csd_loss(s, ids, logprobs, labels=labels, ce_weight=0.2, weighting="ts", backend=backend)
                + topk_kl_loss(s, ids, logprobs, tail=False, backend=backend))

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for seq in (5, 8, 11):
        student = _student(lead=(2, seq))
        ids, logprobs = _teacher(student, 8)
        labels = torch.randint(0, VOCAB, (2, seq), device=DEVICE)
        s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        eager = step(s1, ids, logprobs, labels)
        eager.backward()
        got = compiled(s2, ids, logprobs, labels)
        got.backward()
        assert_close(got, eager, name="compiled loss")
        assert_close(s2.grad, s1.grad, name="compiled gradient")
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[-1] == frames[0], f"graphs compiled after each length: {frames}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync(backend, monkeypatch, reduction):
    from test_compile import forbid_host_sync


    student = _student().requires_grad_(True)
    ids, logprobs = _teacher(student, 8, pattern="padded")
    labels = _labels()
    upstream = torch.ones(LEAD, device=DEVICE) if reduction == "none" else None
    with forbid_host_sync(monkeypatch):
        loss = topk_csd_loss(student, ids.to(torch.int32), logprobs, labels=labels, ce_weight=0.3,
                             reduction=reduction, num_items_in_batch=torch.tensor(5, device=DEVICE), backend=backend)
        loss.backward(upstream)
        topk_kl_loss(student, ids, logprobs, kind="reverse", reduction=reduction, backend=backend).backward(upstream)


# ----------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_large_shape_int64_offsets():
    """N x V above 2^31 elements (bf16): row offsets of the forward, the backward and the support scatter
    must not overflow int32. Checked on the first, a middle and the last row against the reference."""
    n, vocab = 16384, 151936
    student = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    ids, logprobs = teacher_topk(student.detach()[:, :1000].float(), 8)  # any support, cheap to build
    loss = topk_csd_loss(student, ids, logprobs, weighting="ts", reduction="sum", backend="triton")
    (grad,) = torch.autograd.grad(loss, student)
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    s = student.detach()[rows].double().requires_grad_(True)
    want = reference.topk_csd_loss(s, ids[rows], logprobs[rows], weighting="ts", reduction="none")
    got = topk_csd_loss(student.detach()[rows], ids[rows], logprobs[rows], weighting="ts", reduction="none",
                        backend="triton")
    assert_close(got, want.float(), name="loss of the sampled rows")
    (want_grad,) = torch.autograd.grad(want.sum(), s)
    assert_close(grad[rows].float(), want_grad.float(), dtype=torch.bfloat16, name="gradient of the sampled rows")


@pytest.mark.gpu
def test_gpu_bit_identical_runs():
    student = _student(lead=(256,), vocab=151936, dtype=torch.bfloat16)
    ids, logprobs = _teacher(student, 64)
    runs = []
    for _ in range(2):
        s = student.clone().requires_grad_(True)
        loss = topk_csd_loss(s, ids, logprobs, weighting="ts", labels=ids[..., 0], ce_weight=0.5, backend="triton")
        runs.append((loss.detach(), torch.autograd.grad(loss, s)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
