"""The compiled CPU backend (backend="inductor", issue 17) against the float64 reference and the chunked
PyTorch backend: every weighting class, KL, the fused cross-entropy, dtypes, -inf patterns, large
offsets, the rows whose second moments would cancel, strided and broadcast layouts, the "auto" choice
and its fallback, and no recompilation across shapes.

Each structural variant compiles once (seconds); the cases below reuse a few of them on purpose."""

import math
import sys

import pytest
import torch

import reference
from csd_kernels import csd_loss, kl_loss
from csd_kernels.kernels import inductor_backend, torch_backend
from csd_kernels import ops
from csd_kernels.ops import resolve_backend
from helpers import assert_close, assert_gradient, loss_and_grad

pytestmark = pytest.mark.skipif(not inductor_backend.available(), reason="no C++ compiler for Inductor")


# One pair of temperatures throughout: the backward compiles once per loss spec, so the cases below share
# the variants of the first test instead of compiling their own.
TAU = dict(temperature=1.5, teacher_temperature=0.8)
# The structural classes of the forward (which softmaxes carry weight: one, two, one with U, U alone);
# st, su, tt, tu and ut differ from these only in which base leads and in the roles of w1 and w2,
# which the shared `gradient` formula (tested on the chunked backend for every code) and `finalize`
# take care of. (Kept to a few: each compiles for seconds.)
WEIGHTINGS = ("ss", "ts", "us", "uu")


def _logits(lead=(3, 4), vocab=301, offset=0.0, dtype=torch.float32):
    student = 2.0 * torch.randn(*lead, vocab)
    teacher = student + torch.randn(*lead, vocab) + offset
    return student.to(dtype), teacher.to(dtype)


def _check(student, teacher, fn=csd_loss, ref=reference.csd_loss, **kwargs):
    """Loss (per position) and gradient of backend="inductor" against the float64 reference, and the
    loss against the chunked backend on the same inputs."""
    kwargs.setdefault("reduction", "none")
    loss, grad = loss_and_grad(lambda s, t, **k: fn(s, t, backend="inductor", **k), student, teacher, **kwargs)
    ref_loss, ref_grad = loss_and_grad(ref, student.double(), teacher.double(), **kwargs)
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_gradient(grad, ref_grad.to(student.dtype) if student.dtype != torch.float64 else ref_grad, ref,
                    student, teacher, **kwargs)
    chunked = fn(student, teacher, backend="torch", **kwargs)
    assert_close(loss, chunked, dtype=torch.float32, name="loss against the chunked backend")
    return loss, grad


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_every_weighting_class_matches_the_reference(weighting):
    student, teacher = _logits(offset=3.0)
    _check(student, teacher, weighting=weighting, **TAU)


def test_mixture_with_fused_cross_entropy():
    student, teacher = _logits()
    labels = torch.randint(0, 301, (3, 4))
    labels[1, 2] = -100
    weighting = ({"student": 0.5, "teacher": 0.3, "uniform": 0.2}, "teacher")
    from test_fused_ce import fused_reference

    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend="inductor", **k), student, teacher,
                               weighting=weighting, labels=labels, ce_weight=0.7, reduction="none")
    ref_loss, ref_grad = loss_and_grad(fused_reference, student.double(), teacher.double(), weighting=weighting,
                                       labels=labels, ce_weight=0.7, reduction="none")
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(grad, ref_grad, dtype=torch.float32, name="gradient")


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kl_matches_the_reference(kind):
    student, teacher = _logits(offset=-5.0)
    _check(student, teacher, fn=kl_loss, ref=reference.kl_loss, kind=kind, temperature=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)  # fp16 loads as bf16 do
def test_dtypes(dtype):
    student, teacher = _logits(dtype=dtype)
    _check(student, teacher, weighting="ss")


def _columns_reference(student, teacher, bases, scales, second, centres=None):
    """The columns (m, c, Z, S1, S2, n) of the row passes (`cpu_rows.cpp`), in float64 from their
    definition: the specification the C++ is held to, entry by entry. `centres` (N, len(bases)), where
    given, are the c of S, T and U."""
    s, t = student.double(), teacher.double()
    finite_s = s != -math.inf
    valid = finite_s & (t != -math.inf)
    d = torch.where(valid, s - t, 0.0)
    n = valid.double().sum(-1)
    mean_d = d.sum(-1) / n.clamp_min(1.0)
    columns = []
    for base, scale in zip(bases, scales):
        ok = finite_s if base == inductor_backend.CE else valid
        if base == inductor_backend.U:
            top, centre, p = torch.zeros_like(n), mean_d, valid.double()
        else:
            x = t if base == inductor_backend.T else s
            top = torch.where(ok, x, -math.inf).amax(-1)
            centre = mean_d
            if second and base != inductor_backend.CE:
                mode = valid & (x == top[:, None])
                centre = torch.where(mode, d, 0.0).sum(-1) / mode.double().sum(-1).clamp_min(1.0)
            shift = torch.where(top == -math.inf, 0.0, top)[:, None]
            p = torch.where(ok, torch.exp2((x - shift) * scale), 0.0)
        if centres is not None and base != inductor_backend.CE:
            centre = centres[:, bases.index(base)].double()
        e = torch.where(valid, d - centre[:, None], 0.0)
        z, s1, s2 = p.sum(-1), (p * e).sum(-1), (p * e * e).sum(-1)
        if base == inductor_backend.CE or not second:
            s2 = torch.zeros_like(n)
        if base == inductor_backend.CE:
            s1 = torch.zeros_like(n)
        columns.append(torch.stack([top, centre, z, s1, s2, n], -1))
    return torch.stack(columns, 1)


S_, T_, U_, CE_ = inductor_backend.S, inductor_backend.T, inductor_backend.U, inductor_backend.CE
# (bases, second moments, the student's temperature): at temperature 1 the cross-entropy's softmax shares
# S's exponentials on rows where both have one maximum (the teacher is finite at the student's top entry).
ROW_PASS_VARIANTS = [((S_,), True, 1.5), ((T_, S_), True, 1.5), ((S_, U_, CE_), True, 1.5), ((S_, CE_), True, 1.0),
                     ((T_, U_, CE_, S_), True, 1.0), ((U_,), True, 1.5), ((S_, T_), False, 1.5), ((CE_, T_), False, 1.0)]


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2,
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("bases, second, temperature", ROW_PASS_VARIANTS, ids=str)
def test_row_passes_match_their_definition(dtypes, bases, second, temperature):
    """Every column of the C++ row passes against its float64 definition, for every base, mixed input
    dtypes, every length of a row's last partial vector and a row longer than one block (BLOCK = 1024),
    rows inside wider ones (a row stride), ties at the mode (many; two in one vector lane, entries 0 and
    16; two in neighbouring lanes; the first sweep finds a lone mode itself and leaves ties to the
    second), -inf runs and rows without entries."""
    scales = tuple((torch_backend.LOG2E / temperature, torch_backend.LOG2E / 0.8, 0.0, torch_backend.LOG2E)[b]
                   for b in bases)
    for vocab in (*range(1, 35), 1024 + 21):
        student = (3.0 * torch.randn(7, vocab + 7)).to(dtypes[0])[:, :vocab]
        teacher = (student.double() + torch.randn(7, vocab)).to(dtypes[1])
        student[1, :vocab // 2] = -math.inf
        teacher[2, vocab // 3:] = -math.inf
        student[3, ::2] = student[3].max()  # ties at the mode
        teacher[4] = -math.inf  # no entry
        student[5, ::16] = student[5].max() + 1.0  # one lane's tie (one entry where vocab <= 16)
        teacher[5, ::16] = teacher[5].max() + 1.0
        teacher[6, 1:3] = teacher[6].max() + 1.0  # two lanes'
        got = inductor_backend._passes(student, teacher, bases, scales, second)
        want = _columns_reference(student, teacher, bases, scales, second)
        # The moments around the centre the passes report (c is the sums' free origin; its own rounding,
        # some ulps from a sum over many ties, times Z would otherwise show in S1)
        around = _columns_reference(student, teacher, bases, scales, second, got[..., inductor_backend.CENTRE])
        moments = slice(inductor_backend.S1, inductor_backend.S2 + 1)
        want[..., moments] = around[..., moments]
        z, s2 = want[..., inductor_backend.Z], want[..., inductor_backend.S2]
        for column in range(6):
            name = f"V={vocab} column {column}"
            a, b = got[..., column], want[..., column]
            empty = b == -math.inf  # the maximum of a base without entries
            assert torch.equal(a == -math.inf, empty), f"{name}: -inf at {a == -math.inf}, expected at {empty}"
            a, b = a.masked_fill(empty, 0.0), b.masked_fill(empty, 0.0)
            # S1 is a residual (the mean of d - c under the base): judged against its spread, sqrt(Z S2)
            scale = (z * s2).sqrt().max().item() if column == inductor_backend.S1 else None
            assert_close(a, b, dtype=torch.float32, name=name, scale=scale)


@pytest.mark.parametrize("bases, second, temperature", ROW_PASS_VARIANTS[:5], ids=str)
def test_row_passes_around_given_centres(bases, second, temperature):
    """The second pass over rows whose moments cancelled: each base's moments around the centre given."""
    scales = tuple((torch_backend.LOG2E / temperature, torch_backend.LOG2E / 0.8, 0.0, torch_backend.LOG2E)[b]
                   for b in bases)
    for vocab in (5, 1024 + 21):
        student, teacher = 3.0 * torch.randn(4, vocab), torch.randn(4, vocab)
        student[1, :vocab // 2] = -math.inf
        centres = 10.0 * torch.randn(4, len(bases))
        got = inductor_backend._passes(student, teacher, bases, scales, second, centres)
        want = _columns_reference(student, teacher, bases, scales, second, centres)
        z, s2 = want[..., inductor_backend.Z], want[..., inductor_backend.S2]
        for column in range(6):
            a, b = got[..., column], want[..., column]
            scale = (z * s2).sqrt().max().item() if column == inductor_backend.S1 else None
            assert_close(a, b, dtype=torch.float32, name=f"V={vocab} column {column}", scale=scale)


def test_row_passes_propagate_nan():
    """NaN is an entry, not an absence (the contract): it reaches Z of the base whose logit it is, and the
    moments of d (S1, S2) of the other."""
    student, teacher = torch.randn(3, 100), torch.randn(3, 100)
    student[0, 17] = math.nan
    teacher[1, 99] = math.nan
    got = inductor_backend._passes(student, teacher, (inductor_backend.S, inductor_backend.T), (1.0, 1.0), True)
    z, moments = got[..., inductor_backend.Z], got[..., inductor_backend.S1:inductor_backend.S2 + 1]
    assert z[0, 0].isnan() and z[1, 1].isnan() and not z[2].isnan().any(), z
    assert moments[0, 1].isnan().all() and moments[1, 0].isnan().all() and not moments[2].isnan().any(), moments


def test_inf_patterns():
    """-inf runs in either side, rows with one valid entry and rows with none."""
    student, teacher = _logits(lead=(6,), vocab=301)
    student[0, :150] = -math.inf  # a leading run in s
    teacher[1, 200:] = -math.inf  # a trailing run in t
    student[2, 10:290] = -math.inf
    teacher[2, 0] = -math.inf
    student[3, :] = -math.inf  # no valid entry
    student[4, 1:] = -math.inf  # one valid entry
    student[5, ::2] = -math.inf
    teacher[5, 1::4] = -math.inf
    for weighting in ("ss", "ts", "uu"):
        _check(student, teacher, weighting=weighting, **TAU)
    _check(student, teacher, fn=kl_loss, ref=reference.kl_loss, kind="forward", temperature=2.0)


@pytest.mark.parametrize("offset, drift", [(1e4, 0.0), (0.0, 200.0)], ids=["offset-1e4", "drift"])
def test_large_offsets_and_drift(offset, drift):
    """d carrying a large constant (logits of 1e4, exactly representable differences, so that forming
    s - t in fp32 is exact) or drifting along the row: the centres keep the moments precise."""
    from test_input_classes import _offset_logits

    student, teacher = _offset_logits(offset, 301, drift=drift)
    teacher[:, 40:90] = -math.inf
    for weighting in ("ss", "ts", "uu"):
        _check(student, teacher, weighting=weighting, **TAU)


def test_low_temperature():
    student, teacher = _logits(lead=(4,), vocab=301)
    _check(student * 50, teacher * 50, weighting="ss", temperature=0.1, teacher_temperature=0.1)


def _cancelling_rows(vocab=4000, dtype=torch.float32, layout="contiguous"):
    """Rows whose student is nearly uniform with its mode on an outlier of d: centred at the mode,
    S2 Z - S1^2 cancels by a factor of about V. Layouts: rows inside wider ones, a -inf run."""
    student = torch.zeros(2, vocab)
    student[:, 7] = 1e-3  # the mode, by a hair
    teacher = torch.randn(2, vocab)
    teacher[:, 7] = -1000.0  # d = 1000 at the mode, ~N(0, 1) elsewhere
    if layout == "row-slice":
        student = torch.cat([student, torch.randn(2, 33)], -1)[:, :vocab]
    elif layout == "inf-run":
        teacher[:, 100:900] = -math.inf
    return student.to(dtype), teacher.to(dtype)


def _spy_on_passes(monkeypatch, centres=None):
    """Record (rows, centres given?) of every row pass and of every chunked redo; `centres`, where given,
    replaces the centres of every second pass (a retry that cannot help)."""
    calls, chunked_calls = [], []
    passes, chunked = inductor_backend._passes, torch_backend.partials

    def spy(s, t, bases, scales, second, given=None):
        calls.append((s.shape[0], given is not None))
        if given is not None and centres is not None:
            given = centres(s, t, bases, scales, second)
        return passes(s, t, bases, scales, second, given)

    monkeypatch.setattr(inductor_backend, "_passes", spy)
    monkeypatch.setattr(torch_backend, "partials", lambda s, *a: chunked_calls.append(s.shape[0]) or chunked(s, *a))
    return calls, chunked_calls


def _check_loss(student, teacher, weighting="ss"):
    """Loss and gradient of backend="inductor" against the float64 reference (nothing else runs)."""
    kwargs = dict(weighting=weighting, reduction="none", **TAU)
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend="inductor", **k), student, teacher, **kwargs)
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(), **kwargs)
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_gradient(grad, ref_grad.to(student.dtype), reference.csd_loss, student, teacher, **kwargs)


@pytest.mark.parametrize("weighting", ["ss", "ts", ({"student": 0.5, "teacher": 0.3, "uniform": 0.2}, "student")],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "row-slice", "inf-run"])
def test_cancelling_rows_are_taken_again_around_their_means(monkeypatch, weighting, dtype, layout):
    student, teacher = _cancelling_rows(dtype=dtype, layout=layout)
    calls, chunked_calls = _spy_on_passes(monkeypatch)
    _check_loss(student, teacher, weighting)
    assert calls == [(2, False), (2, True)], calls  # both rows, once more around their means
    assert chunked_calls == [], chunked_calls


def test_rows_that_still_cancel_are_redone_exactly(monkeypatch):
    """A second pass around the first pass's own centres cancels again: those rows go to the chunked
    backend's exact pass."""
    student, teacher = _cancelling_rows()
    own = lambda s, t, bases, scales, second: inductor_backend._extension().row_passes(  # noqa: E731
        s, t, list(bases), list(scales), second, None)[..., inductor_backend.CENTRE].contiguous()
    calls, chunked_calls = _spy_on_passes(monkeypatch, centres=own)
    _check_loss(student, teacher)
    assert calls == [(2, False), (2, True)] and chunked_calls == [2], (calls, chunked_calls)


def test_the_cancelling_rows_test_can_fail(monkeypatch):
    """Without the redo, the same rows' loss is visibly wrong: the test above tests something."""
    student, teacher = _cancelling_rows()
    monkeypatch.setattr(inductor_backend, "_MAX_CANCELLATION", math.inf)
    with pytest.raises(AssertionError, match="out of tolerance"):
        _check_loss(student, teacher)


@pytest.mark.parametrize("layout", ["row-slice", "transposed", "broadcast-teacher", "vocab-strided"])
def test_layouts(layout):
    """Rows with a stride (compiled), and layouts only a copy could make rows of (the chunked path)."""
    student, teacher = _logits(lead=(2, 3), vocab=257)
    if layout == "row-slice":  # each row inside a wider one
        student = torch.cat([student, torch.randn(2, 3, 40)], -1)[..., :257]
    elif layout == "transposed":
        student = student.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "broadcast-teacher":
        teacher = teacher[:1].expand(2, 3, 257)
    else:
        student = torch.stack([student, student], -1)[..., 0]
    _check(student, teacher, weighting="ts", **TAU)


def test_auto_picks_the_compiled_backend_for_large_cpu_inputs(monkeypatch):
    big = torch.empty(ops.INDUCTOR_MIN_ELEMENTS // 1000 + 1, 1000)
    small = torch.empty(4, 100)
    assert resolve_backend("auto", big, big) == "inductor"
    assert resolve_backend("auto", small, small) == "torch"
    assert resolve_backend("auto", big, big, family="topk") == "inductor"
    monkeypatch.setattr(ops, "_inductor_available", lambda: False)  # no C++ compiler
    assert resolve_backend("auto", big, big) == "torch"
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        resolve_backend("inductor", small, small)


def test_no_recompilation_across_shapes():
    """dynamic=True: new row counts and vocabularies reuse the compiled code."""
    from torch._dynamo.utils import counters

    def run(lead, vocab):
        student, teacher = _logits(lead=lead, vocab=vocab)
        student.requires_grad_(True)
        csd_loss(student, teacher, weighting="ts", backend="inductor", **TAU).backward()

    run((3, 4), 301)  # compiled (or cached) here
    before = counters["stats"]["unique_graphs"]
    run((5,), 333)
    run((2, 3, 7), 1000)
    assert counters["stats"]["unique_graphs"] == before, "a new shape recompiled the whole-row code"


def test_inside_a_compiled_training_step():
    """The custom operator stays opaque to an outer torch.compile, and runs the compiled backend."""
    student, teacher = _logits(lead=(4,), vocab=301)
    weight = torch.nn.Parameter(torch.eye(301))

    @torch.compile(fullgraph=True)
    def step(s, t):
        return csd_loss(s @ weight, t, weighting="ss", backend="inductor", **TAU)

    loss = step(student, teacher)
    loss.backward()
    expected = reference.csd_loss((student @ weight).double(), teacher.double(), weighting="ss", **TAU)
    assert_close(loss.detach(), expected, dtype=torch.float32, name="loss")
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_inplace_backward():
    """The gradient written into the student logits' storage equals the one in a new buffer."""
    student, teacher = _logits()
    want = loss_and_grad(lambda s, t: csd_loss(s, t, weighting="ts", backend="inductor", **TAU), student, teacher)[1]
    logits = student.clone().requires_grad_(True)
    scaled = logits * 1.0  # a non-leaf whose storage the backward may overwrite
    csd_loss(scaled, teacher, weighting="ts", backend="inductor", inplace_backward=True, **TAU).backward()
    assert_close(logits.grad, want, name="in-place gradient")


def test_cpu_target_benchmark_reports_ratios_from_one_run(tmp_path):
    """benchmarks.cpu_target on a tiny grid: every provider timed beside compiled naive KL, the ratio
    is the quotient of the two medians of the same run, and the table shows it."""
    import csv

    from benchmarks import cpu_target

    times = cpu_target.run_grid([(8, 300, "float32")], ("compiled-naive-kl", "csd-ss", "kl-forward"),
                                log=lambda *a: None)
    path = cpu_target.write_csv(str(tmp_path / "cpu_target.csv"), times, {})
    rows = list(csv.DictReader(open(path)))
    ratio = {r["provider"]: float(r["value"]) for r in rows if r["metric"] == "ratio"}
    ms = {r["provider"]: float(r["value"]) for r in rows if r["metric"] == "time_ms"}
    assert ratio["compiled-naive-kl"] == 1.0
    # the CSV rounds times to 0.001 ms and ratios to 1e-4; these tiny rows take a fraction of a ms
    expected = ms["csd-ss"] / ms["compiled-naive-kl"]
    rounding = 5e-4 * (1 / ms["csd-ss"] + 1 / ms["compiled-naive-kl"]) * expected + 5e-5
    assert ratio["csd-ss"] == pytest.approx(expected, abs=rounding)
    assert f"{ms['kl-forward']:.0f} ({ratio['kl-forward']:.2f})" in cpu_target.markdown(path)


@pytest.mark.slow
def test_cpu_target_reports_the_huge_page_run_beside(tmp_path):
    """The second run (THP_MEM_ALLOC_ENABLE=1, in its own process) lands in the CSV as time_ms_thp and
    ratio_thp rows and in a table of its own, leaving the default run's rows as they are."""
    import csv

    from benchmarks import cpu_target

    grid, providers = [(8, 300, "float32")], ("compiled-naive-kl", "csd-ss")
    times = cpu_target.run_grid(grid, providers, log=lambda *a: None)
    huge = cpu_target.huge_page_grid(grid, providers, log=lambda *a: None)
    assert set(huge) == set(times) and all(ms > 0 for ms in huge.values())
    path = cpu_target.write_csv(str(tmp_path / "cpu_target.csv"), times, {}, huge)
    rows = list(csv.DictReader(open(path)))
    got = {(r["provider"], r["metric"]): float(r["value"]) for r in rows}
    assert got["csd-ss", "ratio_thp"] == pytest.approx(huge["csd-ss", 8, 300, "float32"]
                                                       / huge["compiled-naive-kl", 8, 300, "float32"], rel=1e-3)
    assert got["csd-ss", "time_ms"] == pytest.approx(times["csd-ss", 8, 300, "float32"], abs=1e-3)
    table = cpu_target.markdown(path)
    assert "THP_MEM_ALLOC_ENABLE=1" in table
    assert f"{got['csd-ss', 'time_ms_thp']:.0f} ({got['csd-ss', 'ratio_thp']:.2f})" in table


def _gradient_cases():
    from csd_kernels.contract import LossSpec, kl_spec, parse_weighting

    for code in ("ss", "st", "su", "ts", "tt", "tu", "us", "ut", "uu"):
        yield code, LossSpec(*parse_weighting(code), 1.5, 0.8)
    mixture = parse_weighting(({"student": 0.5, "teacher": 0.3, "uniform": 0.2}, "teacher"))
    yield "mix+ce", LossSpec(*mixture, 1.5, 0.8, csd_weight=0.6, ce_weight=0.7)
    yield "ss+ce", LossSpec(*parse_weighting("ss"), 1.0, 1.0, ce_weight=1.0)
    yield "kl-forward", kl_spec("forward", 2.0)
    yield "kl-reverse", kl_spec("reverse", 0.7)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3, (torch.float16,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("name, spec", list(_gradient_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_row_gradient_matches_its_definition(dtypes, name, spec):
    """The C++ backward (`cpu_rows.cpp`) against `torch_backend.gradient` in float64 on the same row
    statistics, for every weighting, the mixture with the cross-entropy and csd_weight, both KLs; student,
    teacher and gradient dtypes; every length of a row's last partial vector; -inf runs; inactive rows
    (statistics of NaN); an upstream gradient per row; labels at the first and last column, ignored, out of
    range (a NaN row) and owned by another shard (sharded: no NaN); and the gradient written over the
    student's own storage (the in-place backward)."""
    for vocab in (*range(1, 35, 3), 1024 + 21):
        student = (3.0 * torch.randn(6, vocab)).to(dtypes[0])
        teacher = (student.double() + torch.randn(6, vocab)).to(dtypes[1])
        student[1, : vocab // 2] = -math.inf
        teacher[2, vocab // 3:] = -math.inf
        active = torch.tensor([True, True, True, False, True, True])
        labels = torch.tensor([0, vocab - 1, -100, 5, vocab, vocab // 2])
        active_ce = active & (labels != -100)
        _, _, stats = inductor_backend.forward(student, teacher, active if not spec.has_ce else active_ce,
                                               labels if spec.has_ce else None, spec)
        stats[3] = math.nan  # an inactive row's statistics never reach its gradient
        grad_rows = torch.rand(6) + 0.5
        act = active_ce if spec.has_ce else active
        for sharded in ((False, True) if spec.has_ce else (False,)):
            want = torch_backend.gradient(student.double(), teacher.double(), 0, vocab, vocab, stats.double(), act,
                                          labels[:, None] if spec.has_ce else None, grad_rows.double(), spec, sharded)
            out = torch.empty(6, vocab, dtype=dtypes[2])
            got = inductor_backend.backward(student, teacher, act, labels if spec.has_ce else None, stats, grad_rows,
                                            spec, out=out, sharded_labels=sharded)
            assert got is out
            where = f"{name} V={vocab} sharded={sharded}"
            assert torch.equal(got.isnan(), want.isnan()), f"{where}: NaN at {got.isnan().nonzero().tolist()}"
            assert_close(got.nan_to_num(), want.nan_to_num().to(dtypes[2]), dtype=dtypes[2], name=where)
            if dtypes[0] == dtypes[2]:  # in place: the gradient over the student's storage
                inplace = student.clone()
                inductor_backend.backward(inplace, teacher, act, labels if spec.has_ce else None, stats, grad_rows,
                                          spec, out=inplace, sharded_labels=sharded)
                assert torch.equal(inplace.nan_to_num(), got.nan_to_num()), f"{where}: in place differs"


def _mapping_of(address):
    """The /proc/self/smaps entry (header and fields) of the mapping that holds `address`, or None."""
    entry = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's header line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            entry = {"range": (start, end)} if start <= address < end else None
        elif entry is not None and line.endswith("kB\n"):
            key, value = line.split(":")
            entry[key] = int(value.split()[0])
        elif entry is not None and line.startswith("VmFlags"):
            entry["VmFlags"] = line.split()[1:]
            return entry
    return entry


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_gradient_lies_on_huge_pages_and_is_kept_for_the_next_backward(dtype):
    """A backward's new gradient of 2 MB or more is its own mapping, 2 MB-aligned and advised for huge
    pages (the kernel backs it with them unless THP is off), holds the same values as a gradient written
    into a tensor from torch's allocator; freed, its mapping is kept, and the next backward of that size
    writes every entry of it (it was poisoned with NaN); one of twice the size or more maps anew, as
    does a larger one; `empty_cache` unmaps what is kept."""
    import csd_kernels
    from csd_kernels.contract import LossSpec, parse_weighting

    ext = inductor_backend._extension()
    csd_kernels.empty_cache()
    spec = LossSpec(*parse_weighting("ts"), 1.0, 1.0)
    n_rows, vocab = 64, 24000  # 6 MB fp32, 3 MB bf16
    student, teacher = (x.reshape(n_rows, vocab) for x in _logits(lead=(n_rows,), vocab=vocab, dtype=dtype))
    active = torch.ones(n_rows, dtype=torch.bool)
    _, _, stats = inductor_backend.forward(student, teacher, active, None, spec)
    ones = torch.ones(n_rows)
    grad = inductor_backend.backward(student, teacher, active, None, stats, ones, spec)
    want = inductor_backend.backward(student, teacher, active, None, stats, ones, spec,
                                     out=torch.empty(n_rows, vocab, dtype=dtype))
    assert torch.equal(grad, want)
    assert grad.shape == student.shape and grad.dtype == dtype and grad.is_contiguous()
    address = grad.data_ptr()
    assert address % (2 << 20) == 0, hex(address)
    mapping = _mapping_of(address)
    assert mapping is not None and "hg" in mapping["VmFlags"], mapping  # hg: MADV_HUGEPAGE
    length = mapping["range"][1] - mapping["range"][0]
    assert length >= grad.numel() * grad.element_size()
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in thp:
        assert mapping.get("AnonHugePages", 0) > 0, (thp, mapping)
    small = inductor_backend._new_gradient(student[:2, :100])  # below 2 MB: torch's allocator, as before
    assert "hg" not in (_mapping_of(small.data_ptr()) or {"VmFlags": []})["VmFlags"]

    grad.fill_(math.nan)
    del grad
    assert _mapping_of(address)["range"] == mapping["range"], "the freed gradient's mapping was not kept"
    assert ext.cached_gradient_bytes() == length
    again = inductor_backend.backward(student, teacher, active, None, stats, ones, spec)
    assert again.data_ptr() == address and ext.cached_gradient_bytes() == 0
    assert torch.equal(again, want), "an entry of the reused mapping was not written"
    del again
    csd_kernels.empty_cache()
    after = _mapping_of(address)
    assert ext.cached_gradient_bytes() == 0 and (after is None or after["range"] != mapping["range"]), after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_the_kept_gradient_mapping_serves_sizes_up_to_twice_smaller():
    """One mapping kept, the last freed; a request takes it if it is at least as large and at most twice
    the request (rounded to 2 MB pages), and otherwise unmaps it before mapping anew (never two). A
    request served by the kept mapping finds what its last user wrote; a new mapping holds zeros."""
    import csd_kernels

    ext = inductor_backend._extension()
    mb = 1 << 20
    new = lambda size: ext.huge_page_empty([size * mb], torch.uint8)  # noqa: E731
    csd_kernels.empty_cache()
    first = new(8).fill_(7)
    del first
    assert ext.cached_gradient_bytes() == 8 * mb
    reused = new(5)  # rounded to 6 MB: the 8 MB mapping serves it
    assert ext.cached_gradient_bytes() == 0 and (reused == 7).all(), "not the kept mapping"
    reused.fill_(9)
    del reused
    assert ext.cached_gradient_bytes() == 8 * mb  # the whole mapping comes back
    small = new(2)  # 8 MB is more than twice 2 MB
    assert ext.cached_gradient_bytes() == 0 and (small == 0).all(), "the kept mapping served a small request"
    del small
    assert ext.cached_gradient_bytes() == 2 * mb
    large = new(16)
    assert ext.cached_gradient_bytes() == 0 and (large == 0).all()
    del large
    assert ext.cached_gradient_bytes() == 16 * mb
    csd_kernels.empty_cache()
    assert ext.cached_gradient_bytes() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_the_topk_gradient_lies_on_huge_pages_too():
    """The top-k losses' compiled student pass allocates its gradient the same way (topk_inductor.py)."""
    from csd_kernels import teacher_topk, topk_csd_loss

    student, teacher = _logits(lead=(64,), vocab=24000)
    ids, logprobs = teacher_topk(teacher, 8)
    grads = {}
    for backend in ("inductor", "torch"):
        leaf = student.clone().requires_grad_(True)
        topk_csd_loss(leaf, ids, logprobs, weighting="ts", backend=backend).backward()
        grads[backend] = leaf.grad
    assert_close(grads["inductor"], grads["torch"], dtype=torch.float32, name="top-k gradient")
    address = grads["inductor"].data_ptr()
    assert address % (2 << 20) == 0, hex(address)
    assert "hg" in _mapping_of(address)["VmFlags"]
