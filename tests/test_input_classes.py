"""Classes of input that once gave silently wrong numbers (issue 13), each tested as a class.

1. per-row tensors (labels, mask, upstream gradients) as strided, transposed, sliced or expanded views;
2. the per-row shift: -inf runs of every length at the start, middle and end of a row, large offsets,
   and a d that drifts along the row;
4. every integer dtype of labels;
5. precision at extreme logit scales and temperatures, and V = 1;
7. no backward work in `fused_linear_csd_loss` when no gradient is wanted.

(Class 3, the trainer's token count, is in test_transformers.py; class 6, validation, in
test_validation.py.) Every check compares with `reference/` computed in float64 from the same inputs.
"""

import math

import pytest
import torch

import reference
from csd_kernels import csd_loss, fused_linear_csd_loss, kl_loss
from helpers import DEVICE, assert_close, loss_and_grad
from test_fused_ce import fused_reference

LEAD = (3, 4)
VOCAB = 301


def _logits(lead=LEAD, vocab=VOCAB):
    student = 2.0 * torch.randn(*lead, vocab)
    teacher = student + torch.randn(*lead, vocab)
    return student.to(DEVICE), teacher.to(DEVICE)


def _labels(lead=LEAD, vocab=VOCAB):
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    labels[0, 1] = labels[2, 3] = -100
    return labels


# ----------------------------------------------------------------------------------------------------
# 1. per-row tensors as views
# ----------------------------------------------------------------------------------------------------
def _as_view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `x` (shape LEAD), laid out as a non-contiguous view of a larger tensor."""
    if layout == "contiguous":
        return x.clone()
    if layout == "column":  # batch[..., 2]: a column of a larger tensor
        big = torch.zeros(*x.shape, 5, dtype=x.dtype, device=x.device)
        big[..., 2] = x
        return big[..., 2]
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "step-slice":
        big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        big[:, ::2] = x
        return big[:, ::2]
    if layout == "offset-slice":  # a view that starts inside its storage
        big = torch.zeros(x.shape[0] + 1, x.shape[1], dtype=x.dtype, device=x.device)
        big[1:] = x
        return big[1:]
    raise ValueError(layout)


LAYOUTS = ["contiguous", "column", "transposed", "step-slice", "offset-slice"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ce_weight", [0.0, 0.5], ids=["csd", "csd+ce"])
def test_strided_labels_and_mask(backend, row_split, layout, ce_weight):
    student, teacher = _logits()
    labels = _labels()
    mask = torch.rand(LEAD, device=DEVICE) > 0.3
    kwargs = dict(weighting="ts", labels=_as_view(labels, layout), mask=_as_view(mask, layout))
    ref_kwargs = dict(weighting="ts", labels=labels, mask=mask)
    fn = lambda s, t, **k: csd_loss(s, t, backend=backend, ce_weight=ce_weight, **k)  # noqa: E731
    loss, grad = loss_and_grad(fn, student, teacher, **kwargs)
    ref = fused_reference if ce_weight else reference.csd_loss
    extra = dict(ce_weight=ce_weight) if ce_weight else {}
    ref_loss, ref_grad = loss_and_grad(ref, student.double(), teacher.double(), **ref_kwargs, **extra)
    assert_close(loss, ref_loss, dtype=torch.float32, name=f"{layout} loss")
    assert_close(grad, ref_grad, dtype=torch.float32, name=f"{layout} gradient")


@pytest.mark.parametrize("value", [False, True])
@pytest.mark.parametrize("which", ["mask", "labels"])
def test_expanded_per_row_tensors(backend, value, which):
    """Stride-0 broadcasts: torch.tensor([False]).expand(n) must not be read past its storage."""
    student, teacher = _logits(lead=(6,))
    if which == "mask":
        view = torch.tensor([value], device=DEVICE).expand(6)
        kwargs = dict(mask=view)
        ref_kwargs = dict(mask=view.clone())
    else:
        view = torch.tensor([7 if value else -100], device=DEVICE).expand(6)
        kwargs = dict(labels=view, ce_weight=0.5)
        ref_kwargs = dict(labels=view.clone(), ce_weight=0.5)
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend=backend, **k), student, teacher,
                               **kwargs)
    ref_fn = fused_reference if which == "labels" else reference.csd_loss
    ref_loss, ref_grad = loss_and_grad(ref_fn, student.double(), teacher.double(), **ref_kwargs)
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(grad, ref_grad, dtype=torch.float32, name="gradient")


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_strided_upstream_gradient(backend, layout):
    student, teacher = _logits()
    upstream = torch.randn(LEAD, device=DEVICE)
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend=backend, **k), student, teacher,
                               _as_view(upstream, layout), reduction="none", weighting="us")
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(), upstream,
                                       reduction="none", weighting="us")
    assert_close(grad, ref_grad, dtype=torch.float32, name=f"{layout} gradient")


@pytest.mark.parametrize("layout", ["column", "transposed", "step-slice"])
def test_strided_labels_kl_and_fused_linear(backend, layout):
    student, teacher = _logits()
    labels, mask = _labels(), torch.rand(LEAD, device=DEVICE) > 0.3
    loss = kl_loss(student, teacher, backend=backend, labels=_as_view(labels, layout),
                   mask=_as_view(mask, layout), kind="reverse")
    expected = reference.kl_loss(student.double(), teacher.double(), labels=labels, mask=mask, kind="reverse")
    assert_close(loss, expected, dtype=torch.float32, name="kl loss")

    hidden = torch.randn(*LEAD, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(VOCAB, 16, device=DEVICE) * 0.3
    fused = fused_linear_csd_loss(hidden, weight, teacher, labels=_as_view(labels, layout),
                                  mask=_as_view(mask, layout), ce_weight=0.5, backend=backend)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    plain = csd_loss(hidden @ weight.t(), teacher, labels=labels, mask=mask, ce_weight=0.5, backend="torch")
    (g_plain,) = torch.autograd.grad(plain, hidden)
    assert_close(fused, plain, dtype=torch.float32, name="fused-linear loss")
    assert_close(g_fused, g_plain, dtype=torch.float32, name="fused-linear gradient")


# ----------------------------------------------------------------------------------------------------
# 2. the per-row shift
# ----------------------------------------------------------------------------------------------------
def _quantised(x: torch.Tensor) -> torch.Tensor:
    # Multiples of 2^-10 below 2^14 in magnitude are exact in fp32, and so are their differences: the
    # kernels and the float64 reference then see the same d, and only the kernels' arithmetic differs.
    return torch.round(x * 1024) / 1024


def _offset_logits(offset, vocab, lead=(4,), drift=0.0):
    teacher = _quantised(torch.randn(*lead, vocab))
    noise = _quantised(0.1 * torch.randn(*lead, vocab))
    trend = _quantised(drift * torch.linspace(-1, 1, vocab))
    return (teacher + offset + trend + noise).to(DEVICE), teacher.to(DEVICE)


RUNS = [(0, 1), (0, 127), (0, 128), (0, 300), (0, 520), (140, 400), (250, 560), (430, 600)]


@pytest.mark.parametrize("run", RUNS, ids=[f"{a}-{b}" for a, b in RUNS])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4], ids=["1e2", "1e3", "1e4"])
@pytest.mark.parametrize("side", ["teacher", "both"])
def test_shift_with_masked_runs_and_offsets(backend, row_split, run, offset, side):
    """-inf runs up to several blocks (128) and chunks (100) long, at the start, middle and end."""
    vocab = 600
    student, teacher = _offset_logits(offset, vocab)
    a, b = run
    teacher[:, a:b] = -math.inf
    if side == "both":
        student[1, a:b] = -math.inf
    for weighting in ("uu", "ss", "ts", "us"):
        loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend=backend, **k), student,
                                   teacher, weighting=weighting, reduction="none")
        ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(),
                                           weighting=weighting, reduction="none")
        assert_close(loss, ref_loss, dtype=torch.float32, name=f"{weighting} loss")
        assert_close(grad, ref_grad, dtype=torch.float32, name=f"{weighting} gradient")


@pytest.mark.parametrize("weighting", ["uu", "ss", "ts", "us", "tt"])
def test_shift_follows_a_drifting_row(backend, row_split, weighting):
    """d drifting by +-200 along the row: moments kept around one shift would lose ~1e-3 here."""
    student, teacher = _offset_logits(0.0, 900, drift=200.0)
    teacher = teacher * 4  # sharper T, so T-weighted moments sit far from the row's mean
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend=backend, **k), student, teacher,
                               weighting=weighting, reduction="none")
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(),
                                       weighting=weighting, reduction="none")
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(grad, ref_grad, dtype=torch.float32, name="gradient")


@pytest.mark.parametrize("weighting", ["ss", "ts", "st", "tt", "us", "uu"])
def test_mass_jumps_to_a_far_outlier(backend, row_split, weighting):
    """Late in the row one entry takes nearly all of S's and T's mass, at a d 1000 away from the d of
    the blocks before it: the loss is tiny (the rest of the row weighs ~e^-40), so moments kept around
    the earlier blocks' mean, or a block's raw E[dd^2] - E[dd]^2, would cancel to noise of ~1e-2."""
    vocab = 600
    teacher = _quantised(torch.randn(3, vocab))
    student = teacher.clone()
    for row, at in enumerate((450, 599, 130)):
        student[row, at] = 40.0 + 1000.0
        teacher[row, at] = 40.0
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend=backend, **k), student, teacher,
                               weighting=weighting, reduction="none")
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(),
                                       weighting=weighting, reduction="none")
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(grad, ref_grad, dtype=torch.float32, name="gradient")


@pytest.mark.parametrize("weighting", ["ss", "ts", "us"])
def test_blocks_far_below_the_maximum(backend, row_split, weighting):
    """One block of each row lies 95 nats above the rest, so every other block's tiles carry subnormal
    mass (e^-95 ~ 5e-42) relative to each lane's maximum: the forward keeps such a tile's mass out of its
    divisions (on a GPU div.approx.ftz.f32 would flush it and return inf), and it must weigh nothing
    rather than turn the row into NaN, with the far block first, in the middle or last."""
    vocab = 1500
    teacher = _quantised(torch.randn(3, vocab))
    student = _quantised(teacher + 3.0 * torch.randn(3, vocab))
    for row, (lo, hi) in enumerate(((0, 512), (512, 1024), (1024, vocab))):
        teacher[row, lo:hi] = _quantised(torch.randn(hi - lo)) + 95.0
        student[row, lo:hi] = teacher[row, lo:hi] + _quantised(torch.randn(hi - lo))
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend=backend, **k), student, teacher,
                               weighting=weighting, reduction="none")
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(),
                                       weighting=weighting, reduction="none")
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(grad, ref_grad, dtype=torch.float32, name="gradient")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_drifting_row_with_default_blocks(backend_name, row_split):
    """The same with the real block (4096) and chunk sizes: a block's own moments must not cancel."""
    student, teacher = _offset_logits(0.0, 9000, lead=(2,), drift=200.0)
    teacher = teacher * 4
    for weighting in ("ss", "ts", "uu"):
        loss = csd_loss(student, teacher, weighting=weighting, reduction="none", backend=backend_name)
        expected = reference.csd_loss(student.double(), teacher.double(), weighting=weighting, reduction="none")
        assert_close(loss, expected, dtype=torch.float32, name=f"{weighting} loss")


# ----------------------------------------------------------------------------------------------------
# 4. integer label dtypes
# ----------------------------------------------------------------------------------------------------
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64]


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_every_integer_label_dtype(backend, dtype):
    vocab = 120  # fits int8
    student, teacher = _logits(vocab=vocab)
    labels = _labels(vocab=vocab)
    ignore = -100
    if not dtype.is_signed:  # unsigned labels cannot hold -100; a user picks an ignore_index they can
        ignore = vocab + 5
        labels = torch.where(labels == -100, ignore, labels)
    typed = labels.to(dtype)
    for fn in (csd_loss, lambda s, t, **k: fused_linear_csd_loss(s, torch.eye(vocab, device=DEVICE), t, **k)):
        loss, grad = loss_and_grad(fn, student, teacher, labels=typed, ignore_index=ignore, ce_weight=0.5,
                                   backend=backend)
        ref_loss, ref_grad = loss_and_grad(fused_reference, student.double(), teacher.double(),
                                           labels=labels.long(), ignore_index=ignore, ce_weight=0.5)
        assert_close(loss, ref_loss, dtype=torch.float32, name=f"{dtype} loss")
        assert_close(grad, ref_grad, dtype=torch.float32, name=f"{dtype} gradient")


# ----------------------------------------------------------------------------------------------------
# 5. precision at extreme scales
# ----------------------------------------------------------------------------------------------------
def _relative_error(got, expected):
    got, expected = got.double().cpu(), expected.double().cpu()
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def _precision_cases(tau, labels):
    """(name, our function, reference function, keywords) for the precision test."""
    both = dict(temperature=tau, teacher_temperature=tau)
    return [
        ("csd-ss", csd_loss, reference.csd_loss, dict(weighting="ss", **both)),
        ("csd-ts", csd_loss, reference.csd_loss, dict(weighting="ts", **both)),
        ("csd-mix", csd_loss, reference.csd_loss, dict(weighting=({"teacher": 0.3, "uniform": 0.7}, "student"),
                                                       **both)),
        ("csd-uu", csd_loss, reference.csd_loss, dict(weighting="uu")),
        ("csd-ts+ce", csd_loss, fused_reference, dict(weighting="ts", labels=labels, ce_weight=1.0, **both)),
        ("kl-forward", kl_loss, reference.kl_loss, dict(kind="forward", temperature=tau)),
        ("kl-reverse", kl_loss, reference.kl_loss, dict(kind="reverse", temperature=tau)),
    ]


@pytest.mark.parametrize("offset", [1e4, -1e4, 1e2, 0.0], ids=["+1e4", "-1e4", "1e2", "0"])
@pytest.mark.parametrize("tau", [1e-2, 1.0, 1e2], ids=["tau=1e-2", "tau=1", "tau=1e2"])
def test_gradient_precision_at_extreme_scales(backend, offset, tau):
    """fp32 gradient within 1e-5 (relative to its largest entry) of the float64 reference.

    Logits sit around a large common offset with a spread of a few temperatures, so every softmax is
    far from one-hot and d = s - t is exact in fp32: any error is the kernels' own (saved log-sum-exps
    of ~1e4 converted between units cost ~1e-3 here)."""
    g = torch.Generator().manual_seed(1)
    spread = 3.0 * tau
    student = (offset + spread * torch.randn(4, 257, generator=g)).to(DEVICE)
    teacher = (offset + spread * torch.randn(4, 257, generator=g)).to(DEVICE)
    labels = torch.randint(0, 257, (4,), generator=g).to(DEVICE)
    failures = []
    for name, ours, ref, kw in _precision_cases(tau, labels):
        _, grad = loss_and_grad(ours, student, teacher, backend=backend, **kw)
        _, ref_grad = loss_and_grad(ref, student.double(), teacher.double(), **kw)
        err = _relative_error(grad, ref_grad)
        if not err <= 1e-5:
            failures.append(f"{name}: {err:.3g}")
    assert not failures, f"logits {offset} +- {spread}, tau={tau}: relative gradient errors {failures}"


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_single_entry_vocabulary_gives_exactly_zero(backend, scale):
    student = (scale * torch.randn(16, 1)).to(DEVICE)
    teacher = (scale * torch.randn(16, 1)).to(DEVICE)
    labels = torch.zeros(16, dtype=torch.long, device=DEVICE)
    loss, grad = loss_and_grad(csd_loss, student, teacher, labels=labels, ce_weight=1.0, backend=backend,
                               weighting="ts", reduction="none")
    loss = loss.abs().max()
    assert loss.item() == 0.0 and bool((grad == 0).all()), f"loss {loss.item()!r}, gradient {grad.tolist()}"


# ----------------------------------------------------------------------------------------------------
# 7. no work for nothing
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", ["no_grad", "nothing-requires-grad", "inference_mode"])
def test_fused_linear_skips_the_backward_when_no_gradient_is_wanted(monkeypatch, backend, context):
    from csd_kernels.kernels import torch_backend, triton_backend

    calls = []
    for module in (torch_backend, triton_backend):
        original = module.backward
        monkeypatch.setattr(module, "backward", lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
    hidden = torch.randn(*LEAD, 16, device=DEVICE, requires_grad=context != "nothing-requires-grad")
    weight = torch.randn(VOCAB, 16, device=DEVICE, requires_grad=context != "nothing-requires-grad")
    student, teacher = _logits()
    manager = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context)
    if manager is None:
        loss = fused_linear_csd_loss(hidden, weight, teacher, backend=backend, chunk_size=5)
    else:
        with manager():
            loss = fused_linear_csd_loss(hidden, weight, teacher, backend=backend, chunk_size=5)
    assert calls == [], f"the gradient kernels ran {len(calls)} times for a loss nobody differentiates"
    expected = csd_loss(hidden.detach() @ weight.detach().t(), teacher, backend="torch")
    assert_close(loss, expected, dtype=torch.float32, name="loss without gradients")
    assert not loss.requires_grad
