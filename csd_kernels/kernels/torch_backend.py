"""The PyTorch backend of `csd_loss` and `kl_loss`: the streaming pass of `stats.py`, in vocabulary chunks.

Works on any device and dtype. It materialises only (N, chunk) temporaries, never an (N, V) one besides
the gradient itself, so its extra memory is the gradient plus O(N * chunk). It is the CPU path, the
fallback where Triton cannot run, and the second opinion on the Triton kernels in the tests.

Arithmetic is in fp32 (float64 when either input is float64, so `gradcheck` can run).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..contract import LossSpec
from . import stats as st

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Each temporary of the chunk loop holds N * chunk elements, and about ten are alive at once. On a CPU,
# 2^18 elements (1 MiB in fp32) keep them in cache: measured on 2 cores at N=2048, V=32000 fp32, forward
# + backward took 3.9 s with 2^18 and 9.0 s with 2^22 elements. On a GPU, every op is a kernel launch,
# so chunks are 64x longer. At least 256 columns, so very tall inputs do not degenerate into tiny chunks
# (the extra memory is then O(N * 256)).
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
_MIN_CHUNK = 256


def _chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"])
    return max(_MIN_CHUNK, min(vocab, budget // max(n_rows, 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _chunk(x: torch.Tensor, start: int, stop: int, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    # reshape copies only when the leading dims cannot be flattened: an (N, chunk) copy at most.
    return x[..., start:stop].reshape(n_rows, stop - start).to(dtype)


def _chunks(student, teacher, n_rows, dtype):
    vocab = student.shape[-1]
    size = _chunk_size(n_rows, vocab, student.device)
    for start in range(0, vocab, size):
        stop = min(start + size, vocab)
        s = _chunk(student, start, stop, n_rows, dtype)
        t = _chunk(teacher, start, stop, n_rows, dtype)
        valid = (s != -math.inf) & (t != -math.inf)
        yield start, stop, s, t, valid


class _OnlineMoments:
    """Running (max, Z, M1, M2) of one softmax distribution over a row, chunk by chunk.

    moments=0 keeps only the log-sum-exp (the cross-entropy's normaliser), 1 adds M1, 2 adds M2."""

    def __init__(self, n_rows, dtype, device, moments: int):
        self.moments = moments
        self.m = torch.full((n_rows,), -math.inf, dtype=dtype, device=device)
        self.z = torch.zeros(n_rows, dtype=dtype, device=device)
        self.m1 = torch.zeros_like(self.z)
        self.m2 = torch.zeros_like(self.z)

    def update(self, x: torch.Tensor, valid: torch.Tensor, dd: torch.Tensor) -> None:
        x = torch.where(valid, x, -math.inf)
        m_new = torch.maximum(self.m, x.amax(dim=-1))
        # A row with no valid entry yet keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp(self.m - m_safe)
        p = torch.exp(x - m_safe[:, None])
        self.z = self.z * alpha + p.sum(-1)
        if self.moments >= 1:
            pd = p * dd
            self.m1 = self.m1 * alpha + pd.sum(-1)
        if self.moments >= 2:
            self.m2 = self.m2 * alpha + (pd * dd).sum(-1)
        self.m = m_new


def _mix(coeffs, means):
    total = 0.0
    for a, value in zip(coeffs, means):
        if a > 0.0:
            total = total + a * value
    return total


def _label_logits(student, labels, n_rows, vocab, dtype):
    """s[label] per row (N,), NaN where the label is outside [0, V) (documented: no host check)."""
    labels = labels.reshape(n_rows)
    in_range = (labels >= 0) & (labels < vocab)
    index = torch.where(in_range, labels, 0).view(*student.shape[:-1], 1)
    picked = student.gather(-1, index).reshape(n_rows).to(dtype)  # reads one entry per row
    return torch.where(in_range, picked, math.nan)


def partials(
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    labels: Optional[torch.Tensor],
    spec: LossSpec,
) -> torch.Tensor:
    """The streaming pass: (N, stats.PARTIAL) row statistics of these columns (layout in stats.py)."""
    n_rows = active.numel()
    dtype = _compute_dtype(student, teacher)
    device = student.device
    zeros = torch.zeros(n_rows, dtype=dtype, device=device)
    csd = spec.kind == "csd"  # the KL divergences need no second moment
    bases = [
        _OnlineMoments(n_rows, dtype, device, moments=2 if csd else 1) if spec.needs(b) else None
        for b in (0, 1)
    ]
    ce_lse = _OnlineMoments(n_rows, dtype, device, moments=0) if spec.has_ce else None
    count, u1, u2, shift = zeros, zeros, zeros, None
    scales = (1.0 / spec.temperature, 1.0 / spec.teacher_temperature)
    for start, _, s, t, valid in _chunks(student, teacher, n_rows, dtype):
        d = s - t
        if shift is None:
            shift = torch.where(valid, d, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
        dd = torch.where(valid, d - shift[:, None], 0.0)
        count = count + valid.sum(-1)
        for base, logits, scale in zip(bases, (s, t), scales):
            if base is not None:
                base.update(logits * scale, valid, dd)
        if spec.need_uniform:
            u1 = u1 + dd.sum(-1)
            u2 = u2 + (dd * dd).sum(-1)
        if ce_lse is not None:  # the usual cross-entropy: all the student's entries, temperature 1
            ce_lse.update(s, s != -math.inf, None)

    out = torch.zeros(n_rows, st.PARTIAL, dtype=dtype, device=device)
    out[:, st.P_SHIFT] = shift if shift is not None else 0.0
    for base, column in zip(bases + [ce_lse], (st.P_S, st.P_T, st.P_CE)):
        if base is None:
            out[:, column] = -math.inf
            continue
        out[:, column] = base.m * LOG2E  # maxima in log2 units, as the Triton kernels keep them
        out[:, column + 1] = base.z
        if column != st.P_CE:
            out[:, column + 2] = base.m1
            out[:, column + 3] = base.m2
    out[:, st.P_N] = count
    out[:, st.P_U] = u1
    out[:, st.P_U + 1] = u2
    return out


def finalize(
    parts: torch.Tensor,
    student: torch.Tensor,
    active: torch.Tensor,
    labels: Optional[torch.Tensor],
    spec: LossSpec,
    components: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Row statistics (N, PARTIAL) -> (total (N,), components (2, N) = [loss, CE] or None, stats)."""
    n_rows = active.numel()
    dtype = parts.dtype
    zeros = torch.zeros(n_rows, dtype=dtype, device=parts.device)
    shift, count = parts[:, st.P_SHIFT], parts[:, st.P_N]
    stats = torch.zeros(n_rows, st.NUM_STATS, dtype=dtype, device=parts.device)
    inv_n = torch.where(count > 0, 1.0 / count, 0.0)
    means, squares = [], []
    for b, column in enumerate((st.P_S, st.P_T)):
        if not spec.needs(b):
            means.append(zeros)
            squares.append(zeros)
            continue
        m, z, m1, m2 = (parts[:, column + k] for k in range(4))
        stats[:, (st.LSE_S, st.LSE_T)[b]] = m * LN2 + torch.log(z)
        means.append(m1 / z)  # NaN for an empty row, discarded below
        squares.append(m2 / z)
    means.append(parts[:, st.P_U] * inv_n)
    squares.append(parts[:, st.P_U + 1] * inv_n)

    e1, e2 = _mix(spec.w1, means), _mix(spec.w2, means)
    if spec.kind == "csd":
        q1, q2 = _mix(spec.w1, squares), _mix(spec.w2, squares)
        loss = 0.25 * ((q1 - e1 * e1) + (q2 - e2 * e2) + (e1 - e2) ** 2)
    else:  # KL spec: w1 = S, w2 = T, one temperature; log p_S - log p_T = d / tau - lse_S + lse_T
        lse_gap = stats[:, st.LSE_S] - stats[:, st.LSE_T]
        if spec.kind == "kl-forward":
            loss = lse_gap - (e2 + shift) / spec.temperature
        else:
            loss = (e1 + shift) / spec.temperature - lse_gap
    # Rounding can leave a tiny negative variance; `where` (unlike clamp) keeps NaN visible.
    loss = torch.where(loss < 0, 0.0, loss)
    keep = active & (count > 0)
    loss = torch.where(keep, loss, 0.0)
    stats[:, st.E_W1] = torch.where(keep, e1, 0.0)
    stats[:, st.E_W2] = torch.where(keep, e2, 0.0)
    stats[:, st.SHIFT] = shift
    stats[:, st.INV_N] = inv_n
    total = loss if spec.csd_weight == 1.0 else spec.csd_weight * loss
    ce = None
    if spec.has_ce:
        lse1 = parts[:, st.P_CE] * LN2 + torch.log(parts[:, st.P_CE + 1])
        stats[:, st.LSE_1] = lse1
        label_logit = _label_logits(student, labels, n_rows, student.shape[-1], dtype)
        ce = torch.where(active, lse1 - label_logit, 0.0)
        total = total + spec.ce_weight * ce
    pieces = torch.stack([loss, ce if ce is not None else zeros]) if components else None
    return total, pieces, stats


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    labels: Optional[torch.Tensor],
    spec: LossSpec,
    components: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(total (N,), components (2, N) = [loss, CE] or None, row statistics (N, NUM_STATS)).

    Everything is in the compute dtype; `total` is csd_weight * loss + ce_weight * CE (just the loss
    without CE), and excluded positions are 0."""
    return finalize(partials(student, teacher, active, labels, spec), student, active, labels, spec,
                    components)


def backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    labels: Optional[torch.Tensor],
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    spec: LossSpec,
    out: Optional[torch.Tensor] = None,
    sharded_labels: bool = False,
) -> torch.Tensor:
    """Gradient of `total` w.r.t. `student`, scaled per row by `grad_rows` (N,), written into `out`.

    `sharded_labels`: shard-local labels; one outside [0, V) belongs to another vocabulary shard."""
    n_rows = active.numel()
    vocab = student.shape[-1]
    dtype = stats.dtype
    if out is None:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    scale = torch.where(active, grad_rows.reshape(n_rows).to(dtype), 0.0)[:, None]
    col = lambda k: stats[:, k : k + 1]  # noqa: E731
    lse = (col(st.LSE_S), col(st.LSE_T))
    temps = (spec.temperature, spec.teacher_temperature)
    if spec.has_ce:
        labels = labels.reshape(n_rows, 1)
        # A shard-local label outside [0, V) belongs to another shard: no one-hot here, and no NaN.
        bad_label = None if sharded_labels else ((labels < 0) | (labels >= vocab))
    for start, stop, s, t, valid in _chunks(student, teacher, n_rows, dtype):
        dd = s - t - col(st.SHIFT)
        bases = [
            torch.exp(logits / temp - lse_b) if spec.needs(b) else None
            for b, (logits, temp, lse_b) in enumerate(zip((s, t), temps, lse))
        ]
        bases.append(col(st.INV_N) if spec.need_uniform else None)
        if spec.kind == "csd":
            w1 = _mix(spec.w1, bases)
            w2 = _mix(spec.w2, bases)
            g = 0.5 * (w2 * (dd - col(st.E_W1)) + w1 * (dd - col(st.E_W2)))
        elif spec.kind == "kl-forward":
            g = (bases[0] - bases[1]) / spec.temperature
        else:
            g = bases[0] * (dd - col(st.E_W1)) / spec.temperature**2
        g = torch.where(valid, g, 0.0)
        if spec.csd_weight != 1.0:
            g = spec.csd_weight * g
        if spec.has_ce:
            # softmax(s) - onehot(label), formed in fp32 (p - 1 at the label keeps its precision)
            p1 = torch.exp(s - col(st.LSE_1))
            columns = torch.arange(start, stop, device=s.device)
            ce_grad = torch.where(columns == labels, p1 - 1.0, p1)
            if bad_label is not None:
                ce_grad = torch.where(bad_label, math.nan, ce_grad)
            g = g + spec.ce_weight * ce_grad
        g = torch.where(active[:, None], scale * g, 0.0)
        out[..., start:stop] = g.view(*student.shape[:-1], stop - start)
    return out
