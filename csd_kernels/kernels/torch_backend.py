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


def two_sum(a, b):
    """(total, residual) with a + b == total + residual exactly (Knuth's TwoSum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def _chan_update(mu, m2, z_old, p, dd, mu_block, z_block, z_new, second: bool):
    """Fold one chunk (weights p (N, C), its mean mu_block and total z_block per row) into the running
    (mean mu, centred M2, total z_old, already rescaled): Chan et al.'s pairwise update. The chunk's own
    M2 is taken around its own mean, so neither a far shift nor a drifting d makes it cancel."""
    delta = mu_block - mu
    share = torch.where(z_new > 0, z_block / torch.where(z_new > 0, z_new, 1.0), 0.0)
    if second:
        f = dd - mu_block[:, None]  # finite everywhere (dd is 0 outside the row), so p = 0 entries add 0
        m2 = m2 + (p * f * f).sum(-1) + delta * delta * z_old * share
    return mu + delta * share, m2


class _OnlineMoments:
    """Running (max, Z, mu, M2) of one softmax distribution over a row, chunk by chunk (stats.py).

    `scale` is log2(e) / temperature; the max is in raw logit units. moments=0 keeps only (max, Z) (the
    cross-entropy's normaliser), 1 adds the mean mu, 2 the centred second moment M2."""

    def __init__(self, n_rows, dtype, device, moments: int, scale: float):
        self.moments, self.scale = moments, scale
        self.m = torch.full((n_rows,), -math.inf, dtype=dtype, device=device)
        self.z = torch.zeros(n_rows, dtype=dtype, device=device)
        self.mu = torch.zeros_like(self.z)
        self.m2 = torch.zeros_like(self.z)

    def update(self, x: torch.Tensor, valid: torch.Tensor, dd: Optional[torch.Tensor],
               masked: Optional[torch.Tensor] = None, top: Optional[torch.Tensor] = None) -> None:
        """`masked`, `top`: x with invalid entries at -inf and its row maxima, when the caller has them."""
        if masked is None:
            masked = torch.where(valid, x, -math.inf)
            top = masked.amax(dim=-1)
        x = masked
        m_new = torch.maximum(self.m, top)
        # A row with no valid entry yet keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp2((self.m - m_safe) * self.scale)
        p = torch.exp2((x - m_safe[:, None]) * self.scale)  # (x - m) first: exact near the max
        z_block = p.sum(-1)
        z_new = self.z * alpha + z_block
        if self.moments >= 1:
            mu_block = (p * dd).sum(-1) / torch.where(z_block > 0, z_block, 1.0)
            self.mu, self.m2 = _chan_update(self.mu, self.m2 * alpha, self.z * alpha, p, dd, mu_block,
                                            z_block, z_new, self.moments >= 2)
        self.m, self.z = m_new, z_new


def _mix(coeffs, means):
    total = 0.0
    for a, value in zip(coeffs, means):
        if a > 0.0:
            total = total + a * value
    return total


def _label_logits(student, labels, n_rows, vocab, dtype):
    """s[label] per row (N,), NaN where the label is outside [0, V) (documented: no host check)."""
    labels = labels.reshape(n_rows).long()  # gather wants int64; labels may be any integer dtype
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
    csd = spec.kind == "csd"  # the KL divergences need no second moment
    scales = (LOG2E / spec.temperature, LOG2E / spec.teacher_temperature)
    bases = [
        _OnlineMoments(n_rows, dtype, device, 2 if csd else 1, scales[b]) if spec.needs(b) else None
        for b in (0, 1)
    ]
    ce_lse = _OnlineMoments(n_rows, dtype, device, 0, LOG2E) if spec.has_ce else None
    count = torch.zeros(n_rows, dtype=dtype, device=device)
    shift, u_mu, u_m2 = torch.zeros_like(count), torch.zeros_like(count), torch.zeros_like(count)
    for start, _, s, t, valid in _chunks(student, teacher, n_rows, dtype):
        d = s - t
        chunk_n = valid.sum(-1).to(dtype)
        # The shift comes from the first chunk in which the row has any valid entry (stats.py): d at the
        # mode of w1's lead base (the largest s for S, t for T), or for U the mean of the valid d. The
        # lead base's masked logits and row maxima serve its update too, so the seed costs no extra pass.
        lead = spec.lead_base
        masked = top = None
        if lead < 2:
            masked = torch.where(valid, (s, t)[lead], -math.inf)
            top, mode = masked.max(dim=-1)
            seed = torch.where(chunk_n > 0, d.gather(1, mode[:, None]).squeeze(1), 0.0)
        else:
            seed = torch.where(valid, d, 0.0).sum(-1) / chunk_n.clamp_min(1)
        shift = torch.where(count == 0, seed, shift)
        dd = torch.where(valid, d - shift[:, None], 0.0)
        new_count = count + chunk_n
        for b, (base, logits) in enumerate(zip(bases, (s, t))):
            if base is not None:
                base.update(logits, valid, dd, *((masked, top) if b == lead else (None, None)))
        if spec.need_uniform:  # Chan's update with unit weights
            u_mu, u_m2 = _chan_update(u_mu, u_m2, count, valid.to(dtype), dd, dd.sum(-1) / chunk_n.clamp_min(1),
                                      chunk_n, new_count, True)
        count = new_count
        # Move the shift onto the running E_w1, exactly (stats.py): the means stay small and precise
        # even when d drifts along the row.
        means = [base.mu if base is not None else None for base in bases] + [u_mu]
        e_lead = _mix(spec.w1, means)
        shift, residual = two_sum(shift, e_lead)
        for base in bases:
            if base is not None:
                base.mu = (base.mu - e_lead) + residual
        u_mu = (u_mu - e_lead) + residual
        if ce_lse is not None:  # the usual cross-entropy: all the student's entries, temperature 1
            ce_lse.update(s, s != -math.inf, None)

    out = torch.zeros(n_rows, st.PARTIAL, dtype=dtype, device=device)
    out[:, st.P_SHIFT] = shift
    for base, column in zip(bases + [ce_lse], (st.P_S, st.P_T, st.P_CE)):
        if base is None:
            out[:, column] = -math.inf
            continue
        out[:, column] = base.m
        out[:, column + 1] = base.z
        if column != st.P_CE:
            out[:, column + 2] = base.mu
            out[:, column + 3] = base.m2
    out[:, st.P_N] = count
    out[:, st.P_U] = u_mu
    out[:, st.P_U + 1] = u_m2
    return out


def merge_partials(parts: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(N, P, PARTIAL) partial statistics of P column ranges -> (N, PARTIAL) of the whole rows.

    Chan's parallel merge (stats.py), in a fixed order. The label columns (P_LABEL) are summed."""
    if parts.dim() == 2:
        return parts
    count = parts[..., st.P_N]
    n = count.sum(-1)
    scales = (LOG2E / spec.temperature, LOG2E / spec.teacher_temperature, LOG2E)

    def rescaled(column, scale):  # each partial's maximum's factor exp((m_p - m) / tau), and m
        maxima = parts[..., column]
        m = maxima.amax(-1)
        return torch.exp2((maxima - torch.where(m == -math.inf, 0.0, m)[:, None]) * scale), m

    def share(weights):
        total = weights.sum(-1, keepdim=True)
        return torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 0.0)

    # The row's shift: that of the partial holding most of w1's mass (each partial's shift sits on its
    # own E_w1), so that the merged means stay small where they must be precise (stats.py).
    masses = [share(rescaled(c, sc)[0] * parts[..., c + 1]) if spec.needs(b) else None
              for b, (c, sc) in enumerate(zip((st.P_S, st.P_T), scales))]
    lead = _mix(spec.w1, masses + [share(count)])
    shift = parts[..., st.P_SHIFT].gather(1, lead.argmax(-1, keepdim=True)).squeeze(1)
    delta = parts[..., st.P_SHIFT] - shift[:, None]
    out = torch.zeros_like(parts[:, 0])
    out[:, st.P_SHIFT] = shift
    out[:, st.P_N] = n

    def combine(weights, mean, m2):  # -> (sum of weights, mean, centred M2) of the union
        total = weights.sum(-1)
        x = mean + delta
        mu = torch.where(total > 0, (weights * x).sum(-1) / torch.where(total > 0, total, 1.0), 0.0)
        return total, mu, (m2 + weights * (x - mu[:, None]) ** 2).sum(-1)

    for column, scale in zip((st.P_S, st.P_T, st.P_CE), scales):
        a, m = rescaled(column, scale)
        out[:, column] = m
        if column == st.P_CE:
            out[:, column + 1] = (a * parts[..., column + 1]).sum(-1)
            continue
        z, mu, m2 = combine(a * parts[..., column + 1], parts[..., column + 2], a * parts[..., column + 3])
        out[:, column + 1], out[:, column + 2], out[:, column + 3] = z, mu, m2
    _, out[:, st.P_U], out[:, st.P_U + 1] = combine(count, parts[..., st.P_U], parts[..., st.P_U + 1])
    out[:, st.P_LABEL : st.P_LABEL + 2] = parts[..., st.P_LABEL : st.P_LABEL + 2].sum(1)
    return out


def finalize(
    parts: torch.Tensor,
    student: torch.Tensor,
    active: torch.Tensor,
    labels: Optional[torch.Tensor],
    spec: LossSpec,
    components: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Row statistics (N, PARTIAL) or (N, P, PARTIAL) (merged first) -> (total (N,), components
    (2, N) = [loss, CE] or None, stats (N, NUM_STATS))."""
    parts = merge_partials(parts, spec)
    n_rows = active.numel()
    dtype = parts.dtype
    zeros = torch.zeros(n_rows, dtype=dtype, device=parts.device)
    shift, count = parts[:, st.P_SHIFT], parts[:, st.P_N]
    stats = torch.zeros(n_rows, st.NUM_STATS, dtype=dtype, device=parts.device)
    inv_n = torch.where(count > 0, 1.0 / count, 0.0)
    means, variances = [], []
    for b, column in enumerate((st.P_S, st.P_T)):
        if not spec.needs(b):
            means.append(zeros)
            variances.append(zeros)
            continue
        m, z, mu, m2 = (parts[:, column + k] for k in range(4))
        stats[:, (st.M_S, st.M_T)[b]] = m
        stats[:, (st.LOG2Z_S, st.LOG2Z_T)[b]] = torch.log2(z)
        means.append(mu)
        variances.append(m2 / z)  # NaN for an empty row, discarded below
    means.append(parts[:, st.P_U])
    variances.append(parts[:, st.P_U + 1] * inv_n)

    e1, e2 = _mix(spec.w1, means), _mix(spec.w2, means)
    if spec.kind == "csd":
        def variance(coeffs, mean):  # of a mixture, without E[x^2] - E[x]^2 cancellation
            return _mix(coeffs, [v + (mu - mean) ** 2 for v, mu in zip(variances, means)])

        loss = 0.25 * (variance(spec.w1, e1) + variance(spec.w2, e2) + (e1 - e2) ** 2)
    else:  # KL spec: w1 = S, w2 = T, one temperature; log p_S - log p_T = d / tau - lse_S + lse_T
        max_gap = parts[:, st.P_S] - parts[:, st.P_T]
        log_z_gap = (stats[:, st.LOG2Z_S] - stats[:, st.LOG2Z_T]) * LN2
        if spec.kind == "kl-forward":
            loss = ((max_gap - shift) - e2) / spec.temperature + log_z_gap
        else:
            loss = (e1 - (max_gap - shift)) / spec.temperature - log_z_gap
    # Rounding can leave a tiny negative variance; `where` (unlike clamp) keeps NaN visible.
    loss = torch.where(loss < 0, 0.0, loss)
    keep = active & (count > 0)
    loss = torch.where(keep, loss, 0.0)
    # The backward forms d - c - E_w1[d - c] per entry; re-centre c on E_w1 first (stats.py).
    e1, e2 = torch.where(keep, e1, 0.0), torch.where(keep, e2, 0.0)
    centre, residual = two_sum(shift, e1)
    stats[:, st.E_W1] = residual
    stats[:, st.E_W2] = (e2 - e1) + residual
    stats[:, st.SHIFT] = centre
    stats[:, st.INV_N] = inv_n
    total = loss if spec.csd_weight == 1.0 else spec.csd_weight * loss
    ce = None
    if spec.has_ce:
        stats[:, st.M_1] = parts[:, st.P_CE]
        stats[:, st.LOG2Z_1] = torch.log2(parts[:, st.P_CE + 1])
        label_logit = _label_logits(student, labels, n_rows, student.shape[-1], dtype)
        # (max - s[label]) + log Z: exactly 0 for a one-entry row, and no large lse to round
        ce = (stats[:, st.M_1] - label_logit) + stats[:, st.LOG2Z_1] * LN2
        ce = torch.where(active, ce, 0.0)
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


def gradient(s, t, start: int, stop: int, vocab: int, stats, active, labels, grad_rows, spec: LossSpec,
             sharded_labels: bool = False) -> torch.Tensor:
    """The gradient of `total` on columns [start, stop) of rows of V = `vocab` entries: s, t (N, C) in
    the compute dtype, `stats` the forward's (N, NUM_STATS), `labels` (N, 1) when there is a
    cross-entropy, `grad_rows` (N,)."""
    dtype = stats.dtype
    valid = (s != -math.inf) & (t != -math.inf)
    scale = torch.where(active, grad_rows.to(dtype), 0.0)[:, None]
    col = lambda k: stats[:, k : k + 1]  # noqa: E731
    maxima, log_z = (col(st.M_S), col(st.M_T)), (col(st.LOG2Z_S), col(st.LOG2Z_T))
    scales = (LOG2E / spec.temperature, LOG2E / spec.teacher_temperature)
    dd = s - t - col(st.SHIFT)
    bases = [
        torch.exp2((logits - maxima[b]) * scales[b] - log_z[b]) if spec.needs(b) else None
        for b, logits in enumerate((s, t))
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
        p1 = torch.exp2((s - col(st.M_1)) * LOG2E - col(st.LOG2Z_1))
        columns = torch.arange(start, stop, device=s.device)
        ce_grad = torch.where(columns == labels, p1 - 1.0, p1)
        if not sharded_labels:  # a shard-local label outside [0, V) belongs to another shard: no NaN there
            ce_grad = torch.where((labels < 0) | (labels >= vocab), math.nan, ce_grad)
        g = g + spec.ce_weight * ce_grad
    return torch.where(active[:, None], scale * g, 0.0)


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
    dtype = stats.dtype
    if out is None:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    labels = labels.reshape(n_rows, 1) if spec.has_ce else None
    grad_rows = grad_rows.reshape(n_rows)
    for start, stop, s, t, _ in _chunks(student, teacher, n_rows, dtype):
        g = gradient(s, t, start, stop, student.shape[-1], stats, active, labels, grad_rows, spec, sharded_labels)
        out[..., start:stop] = g.view(*student.shape[:-1], stop - start)
    return out
