"""Triton kernels of the top-k losses' student pass: the support logits, the tail's log-sum-exp, and the
gradient of both on the full row.

A top-k row reduces the student's V logits to its K' support logits s[id_k] and one tail bucket,
s'_tail = logsumexp_{j not in ids} s_j (topk.py defines the coarsened rows). The losses themselves are
the dense kernels on the (N, K' + 1) coarsened rows; only these two passes touch the (N, V) logits:

    forward   grid (N,): gathers s[id_k], then streams the row once and returns s'_tail. Reads 2 B per
              element in bf16 (nothing with tail=False and no cross-entropy: K loads per row).
    backward  grid (N, cdiv(V, BLOCK)): writes coef * exp(s_j - s'_tail) (+ the cross-entropy's label
              term) on the block; then `_topk_support_kernel` (grid (N,)) overwrites the support entries
              with their own gradients. Reads 2 B and writes 2 B per element in bf16: with the forward,
              6 B against dense CSD's 10. Rows not 16-byte aligned: two grids, the interior blocks
              without a mask, then the edges (`triton_backend.peel_grids`).

The tail without a membership test. Testing each element against K ids would cost K compares per
element. Instead the pass sums every entry and the support is subtracted:

    Z = sum_j exp(s_j - r),   s'_tail = r + log(Z - sum_k exp(s_k - r))

with a fixed per-row reference r = max_k s[id_k] (no running maximum, no rescaling), each term rounded to
fp32 by one formula (`_term`) and accumulated in fp64. The support's terms are then bitwise the terms
the loop added, so the subtraction removes them exactly, and what remains is the fp32-rounded tail terms
plus fp64 summation error, about V * 2^-53 * Z. Per element: one exp2, one fp32 -> fp64 conversion and
one fp64 add (Hopper converts 16 values per clock per SM: at 2 B per element that pipe alone allows
about 8 TB/s). Rows where the tail holds under CANCEL of Z take the exact pass instead, which tests
each element against the K ids (slow, and only for such rows):
- a student with less than 2^-24 of its mass off the support (the subtraction could lose digits);
- an empty tail (K = V, or every off-support entry -inf);
- a logit more than ~88 above the support's maximum (its fp32 term overflows: Z is inf), or a NaN
  logit on the support (the subtraction gives NaN).

One program per row: the launcher does not split rows (a top-k batch has many rows).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_backend import (LOG2E, _peel_base, _peel_block, _per_row, _row_base, _row_offset, _rows, block_config,
                             peel_grids, peels)

NEG_INF = tl.constexpr(float("-inf"))
NAN = tl.constexpr(float("nan"))
CANCEL = tl.constexpr(2.0**-24)
MAX_K_BLOCK = 1024  # ids handled per step: K larger than this loops over chunks of the ids


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _term(x, r):
    # The one formula for a term of Z: the support's terms must round exactly as the loop's did.
    return tl.exp2((x - r) * LOG2E).to(tl.float64)


@triton.jit
def _sum_pass(s_tile, V, r, mis, BLOCK: tl.constexpr, PEEL: tl.constexpr):
    # Per-lane fp64 sums: no cross-thread reduction inside the loop. PEEL (rows that do not start
    # 16-byte aligned, triton_backend's `peels`): s_tile is the aligned address `mis` entries before the
    # row, so that the blocks after the first move in 128 bits; the first and the last are masked.
    z = tl.zeros([BLOCK], dtype=tl.float64)
    if PEEL:
        hi = V + mis
        cols = tl.arange(0, BLOCK)
        z += _term(tl.load(s_tile + cols, mask=(cols >= mis) & (cols < hi), other=NEG_INF).to(tl.float32), r)
        full = hi // BLOCK
        for start in range(BLOCK, full * BLOCK, BLOCK):
            z += _term(tl.load(s_tile + start + tl.arange(0, BLOCK)).to(tl.float32), r)
        if (full >= 1) & (full * BLOCK < hi):
            cols = full * BLOCK + tl.arange(0, BLOCK)
            z += _term(tl.load(s_tile + cols, mask=cols < hi, other=NEG_INF).to(tl.float32), r)
    else:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z += _term(tl.load(s_tile + cols, mask=cols < V, other=NEG_INF).to(tl.float32), r)
    return tl.sum(z, axis=0)


@triton.jit
def _exact_tail(s_row, ids_row, V, K, BLOCK: tl.constexpr):
    # Online log-sum-exp over the entries whose column is none of the K ids: K compares per element.
    m = tl.full([BLOCK], NEG_INF, dtype=tl.float32)
    z = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(s_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
        for k in range(0, K):
            x = tl.where(cols == tl.load(ids_row + k), NEG_INF, x)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        z = z * tl.exp2((m - m_safe) * LOG2E) + tl.exp2((x - m_safe) * LOG2E)
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row_safe = tl.where(m_row == NEG_INF, 0.0, m_row)
    z_row = tl.sum(z * tl.exp2((m - m_row_safe) * LOG2E), axis=0)
    return tl.where(z_row == 0.0, NEG_INF, m_row_safe + tl.log(z_row))


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _topk_fwd_kernel(
    s_ptr, ids_ptr, active_ptr, support_ptr, tail_ptr,
    V, K, L1, s_so, s_si,
    BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, STREAM: tl.constexpr,
    PEEL: tl.constexpr = False, VEC: tl.constexpr = 1,
):
    row = tl.program_id(0).to(tl.int64)
    s_off = _row_offset(row, L1, s_so, s_si)
    s_row = s_ptr + s_off
    ids_row = ids_ptr + row * K
    # The support logits, and their maximum: the pass's reference r.
    r = tl.full([], NEG_INF, dtype=tl.float32)
    for k0 in range(0, K, K_BLOCK):
        kk = k0 + tl.arange(0, K_BLOCK)
        ids = tl.load(ids_row + kk, mask=kk < K, other=-1)
        in_range = (ids >= 0) & (ids < V)
        x = tl.load(s_row + ids, mask=in_range, other=NEG_INF).to(tl.float32)
        x = tl.where(ids >= V, NAN, x)
        tl.store(support_ptr + row * K + kk, x, mask=kk < K)
        r = tl.maximum(r, tl.max(tl.where(in_range, x, NEG_INF), axis=0))
    if STREAM:
        tail = tl.full([], NEG_INF, dtype=tl.float32)
        if tl.load(active_ptr + row):
            r = tl.where((r > NEG_INF) & (r < float("inf")), r, 0.0)  # no finite support logit: any r
            mis = tl.zeros([], tl.int32)
            if PEEL:
                mis = (s_off % VEC).to(tl.int32)
            z = _sum_pass(_peel_base(s_ptr, s_off, mis, VEC, PEEL), V, r, mis, BLOCK, PEEL)
            z_support = tl.zeros([], dtype=tl.float64)
            for k0 in range(0, K, K_BLOCK):
                kk = k0 + tl.arange(0, K_BLOCK)
                ids = tl.load(ids_row + kk, mask=kk < K, other=-1)
                x = tl.load(support_ptr + row * K + kk, mask=(ids >= 0) & (ids < V), other=NEG_INF)
                z_support += tl.sum(_term(x, r), axis=0)
            z_tail = z - z_support
            if z_tail > z * CANCEL:
                tail = r + tl.log(z_tail.to(tl.float32))
            else:  # also inf and NaN (the docstring's cases)
                tail = _exact_tail(s_row, ids_row, V, K, BLOCK)
        tl.store(tail_ptr + row, tail)


@triton.jit
def _topk_bwd_kernel(
    s_ptr, g_ptr, active_ptr, labels_ptr, tail_ptr, coef_ptr, label_grad_ptr,
    V, L1, first_edge, s_so, s_si, g_so, g_si,
    BLOCK: tl.constexpr, STREAM: tl.constexpr, CE: tl.constexpr,
    PEEL: tl.constexpr = False, MASKED: tl.constexpr = True, VEC: tl.constexpr = 1,
):
    # One block of a row (`_peel_block`: rows that do not start 16-byte aligned are tiled from the
    # aligned address before them, PEEL, in an interior grid without a mask and an edge grid).
    row = tl.program_id(0).to(tl.int64)
    g_off = _row_offset(row, L1, g_so, g_si)
    cols, mis, in_range = _peel_block(g_off, first_edge, V, BLOCK, VEC, PEEL, MASKED)
    g_row = _peel_base(g_ptr, g_off, mis, VEC, PEEL)
    active = tl.load(active_ptr + row)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if STREAM:
        if active:
            s_row = _peel_base(s_ptr, _row_offset(row, L1, s_so, s_si), mis, VEC, PEEL)
            if MASKED:
                x = tl.load(s_row + cols, mask=in_range, other=NEG_INF).to(tl.float32)
            else:
                x = tl.load(s_row + cols).to(tl.float32)
            tail = tl.load(tail_ptr + row)
            tail = tl.where(tail == NEG_INF, 0.0, tail)  # then coef is 0 and no entry off the support is finite
            g = tl.where(x == NEG_INF, 0.0, tl.load(coef_ptr + row) * tl.exp2((x - tail) * LOG2E))
            if CE:
                g += tl.where(cols - mis == tl.load(labels_ptr + row), tl.load(label_grad_ptr + row), 0.0)
    if MASKED:
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=in_range)
    else:
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty))


@triton.jit
def _topk_support_kernel(g_ptr, ids_ptr, active_ptr, values_ptr, V, K, L1, g_so, g_si, K_BLOCK: tl.constexpr):
    # Launched after _topk_bwd_kernel (stream order): the support entries take their own gradient.
    row = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + row):
        g_row = _row_base(g_ptr, row, L1, g_so, g_si)
        for k0 in range(0, K, K_BLOCK):
            kk = k0 + tl.arange(0, K_BLOCK)
            ids = tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1)
            here = (ids >= 0) & (ids < V)
            values = tl.load(values_ptr + row * K + kk, mask=here, other=0.0)
            tl.store(g_row + ids, values.to(g_ptr.dtype.element_ty), mask=here)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _k_block(k: int) -> int:
    return min(MAX_K_BLOCK, triton.next_power_of_2(k))


def student_pass(student: torch.Tensor, ids: torch.Tensor, active: torch.Tensor,
                 stream: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(support (N, K) fp32, tail (N,) fp32): see the module docstring and topk_torch.student_pass."""
    n_rows, k = ids.shape
    support = torch.empty(n_rows, k, dtype=torch.float32, device=student.device)
    tail = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return support, tail
    (s,), l1, ((s_so, s_si),) = _rows(student)
    block, num_warps = block_config(student.shape[-1])
    _topk_fwd_kernel[(n_rows,)](
        s, ids, _per_row(active, n_rows), support, tail,
        student.shape[-1], k, l1, s_so, s_si,
        BLOCK=block, K_BLOCK=_k_block(k), STREAM=stream, num_warps=num_warps,
        PEEL=stream and peels((s,), ((s_so, s_si),)), VEC=16 // s.element_size(),
    )
    return support, tail


def student_backward(student: torch.Tensor, ids: torch.Tensor, active: torch.Tensor,
                     labels: Optional[torch.Tensor], tail: torch.Tensor, coef: torch.Tensor,
                     values: torch.Tensor, label_grad: Optional[torch.Tensor], stream: bool) -> torch.Tensor:
    """The gradient on the full row: see topk_torch.student_backward."""
    n_rows, k = ids.shape
    vocab = student.shape[-1]
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return out
    (s, g), l1, ((s_so, s_si), (g_so, g_si)) = _rows(student, out)
    active = _per_row(active, n_rows)
    ce = label_grad is not None
    block, num_warps = block_config(vocab)
    # (without STREAM the student is not read: only the gradient's layout matters)
    first_edge, grids = peel_grids((s, g) if stream else (g,), ((s_so, s_si), (g_so, g_si)) if stream
                                   else ((g_so, g_si),), vocab, block)
    labels = _per_row(labels, n_rows) if ce else active
    for programs, layout in grids:
        _topk_bwd_kernel[(n_rows, programs)](
            s, g, active, labels, tail.contiguous(), coef.contiguous(), label_grad.contiguous() if ce else coef,
            vocab, l1, first_edge, s_so, s_si, g_so, g_si,
            BLOCK=block, STREAM=stream, CE=ce, num_warps=num_warps, **layout,
        )
    _topk_support_kernel[(n_rows,)](g, ids, active, values.contiguous(), vocab, k, l1, g_so, g_si,
                                    K_BLOCK=_k_block(k), num_warps=4)
    if g is not out:
        out.copy_(g)
    return out
