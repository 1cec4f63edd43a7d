"""Rows that do not start 16-byte aligned (an odd V, GPT-2's 50257): the Triton backward tiles them from
the aligned address before each row (PEEL) when s, t and the gradient lie equally far past one, in two
grids: the interior blocks without a mask, then the edges (the first block and those from `first_edge`
on) masked entry by entry. Every other layout keeps the one masked grid. The top-k losses' student
pass does the same. (The raw forward's PEEL is tested in test_raw_forward.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import reference
from csd_kernels import csd_loss, kl_loss, topk_csd_loss
from helpers import DEVICE, assert_close
from test_fused_ce import fused_reference
from test_topk import _teacher

tb = pytest.importorskip("csd_kernels.kernels.triton_backend")

VOCAB = 1201


@pytest.fixture
def grids(monkeypatch):
    """The backward's launches: (programs per row, PEEL, MASKED) of each."""
    seen = []
    kernel = tb._bwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid[1], kwargs["PEEL"], kwargs["MASKED"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tb, "_bwd_kernel", Recorder())
    return seen


def _layout(layout, dtype, rows=6):
    """(student leaf, the student view the loss sees, teacher) of `layout`, with -inf at both ends of
    rows and a run longer than a block."""
    torch.manual_seed(5)
    width = VOCAB + (8 if layout == "congruent-strides" else 9)
    wide_s = (2.0 * torch.randn(rows, width)).to(DEVICE, dtype)
    wide_t = (wide_s.float() + torch.randn(rows, width, device=DEVICE)).to(dtype)
    cut = slice(1, VOCAB + 1) if layout == "offset" else slice(0, VOCAB)
    leaf = (wide_s if layout in ("congruent-strides", "offset") else wide_s[:, cut].contiguous()).clone()
    leaf.requires_grad_(True)
    student = leaf[:, cut] if leaf.shape[-1] != VOCAB else leaf
    teacher = wide_t[:, cut] if layout in ("congruent-strides", "offset", "unlike-strides") \
        else wide_t[:, cut].contiguous()
    with torch.no_grad():
        leaf_view = leaf[:, cut] if leaf.shape[-1] != VOCAB else leaf
        leaf_view[0, 0] = -math.inf
        leaf_view[3, :700] = -math.inf
    teacher[1, :3] = -math.inf
    teacher[2, VOCAB - 2:] = -math.inf
    return leaf, student, teacher


# block: the backward's (4096 on CPU, one edge grid and no interior at V = 1201), 1024 (no interior,
# edges 0 and 1) and 256 (interior blocks 1 .. 3, edges 0 and 4)
BLOCKS = pytest.mark.parametrize("block", [None, 1024, 256], ids=["default-block", "block-1024", "block-256"])


@BLOCKS
@pytest.mark.parametrize("layout, peel", [("contiguous", True), ("congruent-strides", True), ("offset", False),
                                          ("unlike-strides", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["ts", "us+ce-masked", "kl-inplace"])
def test_backward_of_rows_not_16_byte_aligned(grids, monkeypatch, block, layout, peel, dtype, case):
    if block is not None:
        monkeypatch.setattr(tb, "block_config", lambda vocab: (block, 4))
    leaf, student, teacher = _layout(layout, dtype)
    kwargs = dict(weighting="ts")
    if case == "us+ce-masked":  # labels at both ends and inside; excluded rows write zeros
        labels = torch.tensor([1, VOCAB - 1, 0, 900, 260, 511], device=DEVICE)
        mask = torch.tensor([True, True, False, True, True, False], device=DEVICE)
        kwargs = dict(weighting="us", labels=labels, mask=mask, ce_weight=0.5)
    inplace = case == "kl-inplace" and layout == "contiguous"
    upstream = torch.linspace(0.5, 2.0, student.shape[0], device=DEVICE)
    reference_student = student.detach().double().requires_grad_(True)
    if case == "kl-inplace":
        loss = kl_loss(student, teacher, backend="triton", reduction="none", inplace_backward=inplace)
        expected = reference.kl_loss(reference_student, teacher.double(), reduction="none")
    else:
        loss = csd_loss(student, teacher, backend="triton", reduction="none", **kwargs)
        expected = fused_reference(reference_student, teacher.double(), reduction="none", **kwargs) \
            if "ce_weight" in kwargs else reference.csd_loss(reference_student, teacher.double(),
                                                             reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    (expected_grad,) = torch.autograd.grad(expected, reference_student, upstream.double())
    assert_close(loss, expected, dtype=torch.float32, name="loss")
    if leaf.shape[-1] != VOCAB:
        cut = slice(1, VOCAB + 1) if layout == "offset" else slice(0, VOCAB)
        assert bool((grad[:, VOCAB + (layout == "offset"):] == 0).all()) and (layout != "offset" or
                                                                                bool((grad[:, 0] == 0).all()))
        grad = grad[:, cut]
    assert_close(grad, expected_grad, dtype=dtype, name="gradient")
    used = block or tb.block_config(VOCAB)[0]
    first_edge = max(VOCAB // used, 1)
    vec = 16 // student.element_size()
    if peel:
        expected_grids = [(first_edge - 1, True, False), (1 + -(-(VOCAB + vec - 1) // used) - first_edge, True, True)]
        expected_grids = [g for g in expected_grids if g[0]]
    else:
        expected_grids = [(-(-VOCAB // used), False, True)]
    assert grids == expected_grids, grids


@BLOCKS
@pytest.mark.parametrize("layout, peel", [("contiguous", True), ("offset", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk_student_pass_of_rows_not_16_byte_aligned(monkeypatch, block, layout, peel, dtype):
    """The top-k losses' student pass: its forward's sum over the row and its backward take PEEL on
    the same layouts (the forward's first and last blocks masked, the backward in two grids)."""
    tk = pytest.importorskip("csd_kernels.kernels.topk_triton")
    if block is not None:
        monkeypatch.setattr(tk, "block_config", lambda vocab: (block, 4))
    seen = []
    for name in ("_topk_fwd_kernel", "_topk_bwd_kernel"):
        kernel = getattr(tk, name)

        class Recorder:
            def __getitem__(self, grid, kernel=kernel, name=name):
                def launch(*args, **kwargs):
                    seen.append((name, grid[-1] if name == "_topk_bwd_kernel" else 1, kwargs["PEEL"]))
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(tk, name, Recorder())
    leaf, student, _ = _layout(layout, dtype)
    ids, logprobs = _teacher(student.detach().float(), 8)
    upstream = torch.linspace(0.5, 2.0, student.shape[0], device=DEVICE)
    loss = topk_csd_loss(student, ids, logprobs, weighting="ts", backend="triton", reduction="none")
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    exact = student.detach().double().requires_grad_(True)
    expected = reference.topk_csd_loss(exact, ids, logprobs, weighting="ts", reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, exact, upstream.double())
    assert_close(loss, expected, dtype=torch.float32, name="loss")
    if layout == "offset":
        grad = grad[:, 1:VOCAB + 1]
    assert_close(grad, expected_grad, dtype=dtype, name="gradient")
    used = block or tk.block_config(VOCAB)[0]
    first_edge = max(VOCAB // used, 1)
    backward = [(p, layout_peel) for name, p, layout_peel in seen if name == "_topk_bwd_kernel"]
    assert [p for name, _, p in seen if name == "_topk_fwd_kernel"] == [peel], seen
    if peel:
        vec = 16 // student.element_size()
        grids = [(first_edge - 1, True), (1 + -(-(VOCAB + vec - 1) // used) - first_edge, True)]
        assert backward == [g for g in grids if g[0]], seen
    else:
        assert backward == [(-(-VOCAB // used), False)], seen
