"""The Triton forward's raw pass (`_fwd_raw_kernel`, unsplit and split rows) and its recomputation:
ordinary rows stay on the raw pass and match the reference; rows whose raw sums cancel, overflow or hold
no entry are recomputed exactly, and without that those rows would be visibly wrong (so the tests can
fail)."""

from __future__ import annotations

import math

import pytest
import torch

import reference
from csd_kernels import csd_loss
from helpers import DEVICE, assert_close, loss_and_grad
from test_fused_ce import fused_reference

tb = pytest.importorskip("csd_kernels.kernels.triton_backend")


@pytest.fixture(params=[1, 3], ids=["one-program-per-row", "split-rows"])
def redone(request, monkeypatch):
    """The number of rows each forward handed to the exact pass (one entry per forward): unsplit, the
    exact forward's REDO launch; split, the exact merge's (its active flags are the raw merge's)."""
    counts = []
    name = "_fwd_kernel" if request.param == 1 else "_merge_kernel"
    exact = getattr(tb, name)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs.get("REDO"):
                    counts.append(int((args[3] != 0).sum()))  # active_ptr: the raw pass's redo flags
                return exact[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tb, name, Recorder())
    monkeypatch.setattr(tb, "split_count", lambda *args: request.param)
    return counts


def _check(student, teacher, **kwargs):
    loss, grad = loss_and_grad(lambda s, t, **k: csd_loss(s, t, backend="triton", **k), student, teacher,
                               reduction="none", **kwargs)
    ref_loss, ref_grad = loss_and_grad(reference.csd_loss, student.double(), teacher.double(),
                                       reduction="none", **kwargs)
    assert_close(loss, ref_loss, dtype=torch.float32, name="loss")
    assert_close(grad, ref_grad, dtype=student.dtype, name="gradient")


MIX = ({"teacher": 0.3, "student": 0.5, "uniform": 0.2}, {"teacher": 0.15, "student": 0.85})


@pytest.mark.parametrize("weighting", ["ss", "ts", "st", "tt", "us", "uu", MIX],
                         ids=["ss", "ts", "st", "tt", "us", "uu", "mix"])
@pytest.mark.parametrize("vocab", [300, 1100])
def test_ordinary_rows_stay_on_the_raw_pass(redone, weighting, vocab):
    """LLM-like rows (a spread of a few nats, -inf runs, a student near its teacher): none is redone."""
    torch.manual_seed(0)
    teacher = 2.0 * torch.randn(4, vocab)
    student = teacher + 0.7 * torch.randn(4, vocab)
    teacher[1, :40] = -math.inf
    student[2, 100:130] = -math.inf
    _check(student.to(DEVICE), teacher.to(DEVICE), weighting=weighting)
    assert redone == [0], redone


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["shared-exponentials", "own-exponentials"])
def test_ordinary_rows_with_cross_entropy(redone, temperature):
    """The fused CE on the raw pass: at temperature 1 it shares S's exponentials (SHARE_CE)."""
    torch.manual_seed(1)
    teacher = 2.0 * torch.randn(3, 700)
    student = teacher + torch.randn(3, 700)
    labels = torch.tensor([5, 699, 0])
    kwargs = dict(weighting="ts", labels=labels.to(DEVICE), ce_weight=0.5, temperature=temperature,
                  reduction="none")
    total = csd_loss(student.to(DEVICE), teacher.to(DEVICE), backend="triton", **kwargs)
    expected = reference.csd_loss(student.double(), teacher.double(), weighting="ts", temperature=temperature,
                                  reduction="none")
    expected = expected + 0.5 * torch.nn.functional.cross_entropy(student.double(), labels, reduction="none")
    assert_close(total, expected, dtype=torch.float32, name="loss + CE")
    assert redone == [0], redone


def _peaked_rows(vocab=3000):
    """T puts all but ~1e-5 of its mass on one entry past the first block, where d is 10 away from the d
    at the first block's mode: "tt" is then Var_T(d) ~ 1e-3, while the raw sums around the first block's
    d carry 10^2 = 100 each (E[x^2] - E[x]^2 cancels by ~1e5). (A larger d would test the gradient's
    absolute tolerance against the rounding of E_T[d] itself, 2^-24 |d|.)"""
    torch.manual_seed(2)
    teacher = torch.randn(2, vocab)
    student = teacher + 0.1 * torch.randn(2, vocab)
    for row, at in enumerate((2000, vocab - 1)):
        teacher[row, at] = 20.0
        student[row, at] = 30.0
    return student.to(DEVICE), teacher.to(DEVICE)


def test_cancelling_rows_are_redone_exactly(redone, request):
    """Unsplit, a second raw pass around the first's E_w1 recovers them (its bound is 4 * loss itself),
    so the exact pass gets none; split rows are judged by the merge and go to the exact pass."""
    student, teacher = _peaked_rows()
    _check(student, teacher, weighting="tt")
    split = "split-rows" in request.node.callspec.id
    assert redone == ([2] if split else [0]), redone


def test_the_cancelling_rows_test_can_fail(redone, monkeypatch):
    """With the redo switched off (every first raw pass kept), the same rows' loss is out of tolerance:
    the test above passes only because the rows were recomputed."""
    student, teacher = _peaked_rows()
    monkeypatch.setattr(tb, "MAX_CANCELLATION", math.inf)
    loss = csd_loss(student, teacher, weighting="tt", backend="triton", reduction="none")
    expected = reference.csd_loss(student.double(), teacher.double(), weighting="tt", reduction="none")
    assert redone == [0], redone
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close(loss, expected, dtype=torch.float32, name="loss")


@pytest.mark.parametrize("case", ["maximum-far-above", "nan", "no-valid-entry"])
def test_rows_the_raw_sums_cannot_hold_are_redone(redone, case):
    """A maximum 200 nats above the first block's (its exponentials overflow), a NaN (propagated by the
    exact pass) and a row of -inf: each one row redone, and the result the reference's."""
    torch.manual_seed(3)
    teacher = torch.randn(3, 1500)
    student = teacher + 0.5 * torch.randn(3, 1500)
    if case == "maximum-far-above":  # past the first block of its row and of its split range
        student[1, 1400], teacher[1, 1400] = 200.0, 200.5
    elif case == "nan":
        student[1, 900] = math.nan
    else:
        teacher[1] = -math.inf
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    if case == "nan":
        loss = csd_loss(student, teacher, weighting="ts", backend="triton", reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), loss
    else:
        _check(student, teacher, weighting="ts")
    assert redone == [1], redone


def test_the_flag_rate_model_is_the_kernels_test(monkeypatch):
    """benchmarks/flag_rate.py models which rows the raw pass sends to a second read: on flat rows and
    on rows with a dominant teacher peak past the first block, its float64 test flags exactly the rows
    the kernel flags (1) before its second pass."""
    from benchmarks.flag_rate import flagged
    from csd_kernels.contract import LossSpec, parse_weighting

    torch.manual_seed(5)
    teacher = 2.0 * torch.randn(8, 1500)
    teacher[4:, 1000:1004] += torch.tensor([20.0, 19.0, 18.0, 21.0]).diag()  # rows 4-7: one peak each
    student = teacher + torch.randn(8, 1500)
    flags = []
    raw = tb._fwd_raw_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs.get("RETRY"):
                    flags.append(args[3].clone())  # the first pass's flags, before the second pass
                return raw[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tb, "_fwd_raw_kernel", Recorder())
    monkeypatch.setattr(tb, "split_count", lambda *args: 1)
    csd_loss(student.to(DEVICE), teacher.to(DEVICE), weighting="tt", backend="triton")
    first_block = tb.forward_config(1500, student.element_size(), tb.RAW_WARPS)[0]
    model = flagged(student.double(), teacher.double(), LossSpec(*parse_weighting("tt"), 1.0, 1.0), first_block,
                    tb.MAX_CANCELLATION)
    assert model.tolist() == [False] * 4 + [True] * 4, model
    assert (flags[0].cpu() == 1).tolist() == model.tolist(), flags


def test_the_flag_rate_model_writes_its_csv(tmp_path):
    """`python -m benchmarks.flag_rate` on small rows: a CSV with every setting, no flat row flagged, and
    more rows flagged on the most confident teacher than on the flat one."""
    import csv

    from benchmarks import flag_rate

    flag_rate.run(str(tmp_path), rows=12, vocab=1000, batch=5)
    rows = list(csv.DictReader(open(tmp_path / "flag_rate.csv")))
    assert len(rows) == len(flag_rate.PEAKS) * len(flag_rate.NOISES) * len(flag_rate.WEIGHTINGS)
    assert list(rows[0]) == flag_rate.FIELDS
    by = {(float(r["peak"]), float(r["noise"]), r["weighting"]): float(r["flagged"]) for r in rows}
    assert all(by[(0.0, noise, w)] == 0.0 for noise in flag_rate.NOISES for w in flag_rate.WEIGHTINGS), by
    assert by[(20.0, 1.0, "tt")] > 0.3, by


def _spy_on_peel(monkeypatch):
    """The raw forward's PEEL decisions, one per launch."""
    seen = []
    raw = tb._fwd_raw_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["PEEL"], kwargs["EDGE_WORDS"]))
                return raw[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tb, "_fwd_raw_kernel", Recorder())
    return seen


@pytest.mark.parametrize("weighting", ["ts", "us", MIX], ids=["ts", "us", "mix"])
@pytest.mark.parametrize("layout, peel", [("rows", True), ("even-rows", True), ("wider-rows", True),
                                          ("offset", False), ("unlike-strides", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5], ids=["csd", "csd+ce"])
def test_rows_not_16_byte_aligned(redone, monkeypatch, weighting, layout, peel, dtype, ce_weight):
    """Rows that do not start 16-byte aligned (V = 1201, odd as GPT-2's 50257) are tiled from the aligned
    address before them (PEEL: 128-bit loads inside the range, its first and last blocks masked) when s
    and t lie equally far past one; a pointer that is not 16-byte aligned, or s and t at different
    offsets from one, keep the entry-wise layout. -inf at both ends of rows and a prefix longer than a
    block (512 entries in bf16, 256 in fp32). bf16 edges load as whole words (EDGE_WORDS) where the
    storage holds the entry after the last row's end: not for 5 contiguous rows of 1201 (N V odd)."""
    seen = _spy_on_peel(monkeypatch)
    torch.manual_seed(3)
    vocab = 1201
    wide_s = (2.0 * torch.randn(5, vocab + 9)).to(DEVICE, dtype)
    wide_t = (wide_s.float() + torch.randn(5, vocab + 9, device=DEVICE)).to(dtype)
    student, teacher = {
        "rows": (wide_s[:, :vocab].contiguous(), wide_t[:, :vocab].contiguous()),
        # a sixth row: N V even
        "even-rows": (torch.cat([wide_s[:, :vocab], wide_s[:1, 9:]]), torch.cat([wide_t[:, :vocab], wide_t[:1, 9:]])),
        "wider-rows": (wide_s[:, :vocab], wide_t[:, :vocab]),
        "offset": (wide_s[:, 1:vocab + 1], wide_t[:, 1:vocab + 1]),
        "unlike-strides": (wide_s[:, :vocab].contiguous(), wide_t[:, :vocab]),
    }[layout]
    student[0, 0] = -math.inf
    teacher[1, :3] = -math.inf
    teacher[2, vocab - 2:] = -math.inf
    student[3, :700] = -math.inf
    # the forward alone: loss_and_grad's copy of the student would change its layout
    if ce_weight:  # the fused CE sums every finite s: a word's half outside the range must not add
        labels = torch.tensor([1, vocab - 1, 0, 900, 260] + [7] * (student.shape[0] - 5), device=DEVICE)
        loss = csd_loss(student, teacher, backend="triton", reduction="none", weighting=weighting, labels=labels,
                        ce_weight=ce_weight)
        expected = fused_reference(student.double(), teacher.double(), reduction="none", weighting=weighting,
                                   labels=labels, ce_weight=ce_weight)
    else:
        loss = csd_loss(student, teacher, backend="triton", reduction="none", weighting=weighting)
        expected = reference.csd_loss(student.double(), teacher.double(), reduction="none", weighting=weighting)
    assert_close(loss, expected, dtype=torch.float32, name="loss")
    edge_words = peel and dtype == torch.bfloat16 and layout != "rows"
    assert seen and all(p == (peel, edge_words) for p in seen), seen
    # unsplit no row is redone; split, the row whose first program's range holds no entry (row 3) is
    programs = tb.split_count(5, vocab, 512, student.device)  # the fixture's
    assert redone == [0 if programs == 1 else 1], redone
