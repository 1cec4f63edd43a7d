"""The compiled CPU backend of `csd_loss` and `kl_loss` ("inductor"): the row statistics of `stats.py` in
closed form over whole rows, compiled by Inductor's C++ code generation.

Why a second PyTorch backend: on a CPU the chunked backend (`torch_backend.py`) runs some forty small
eager ops per chunk, each a pass through memory, and is about 5x slower than `torch.compile` of a naive
KL. Written over whole rows, the same statistics are a few reductions per row that Inductor fuses into
one loop nest per call: an outer loop over rows (OpenMP threads) and, inside it, one vectorised loop
per pass over the row, which stays in the core's L2 cache between passes. Nothing of size N x V is
materialised besides the gradient itself.

The forward is one compiled call. Every base the loss needs (S: x = s, T: x = t, U: x = 0, and the
cross-entropy's softmax: x = s over every finite s, temperature 1) sits on a middle axis (N, B, V) of
one broadcast expression, so the loop nest is rows, bases, then three passes over the row:

    1:  the maximum m_B of x over the base's entries, and their count n;
    2:  the centre c_B: d at the mode (the mean of d over the entries where x = m_B, so for U the mean
        of d), a masked sum where an argmax and a gather would split the loop nest;
    3:  with p = exp2((x - m_B) log2(e) / tau_B) (1 for U) and e = d - c_B on the base's entries:
        Z_B = sum p, S1_B = sum p e, S2_B = sum p e^2.

    Then E_B[d - c_B] = S1 / Z and M2_B = S2 - S1^2 / Z.

The last subtraction cancels when the base's mean lies far from its centre compared with its spread:
the relative error of M2 is about F * 2^-24 with F = S2 Z / (S2 Z - S1^2). F is small for almost every
row (at the mode of a peaked distribution F ~ 1; a flat one has its mode within a few spreads of the
mean), and a row where F > 16 for any base is redone, those rows only, by the chunked backend's exact
streaming pass. The KL divergences need no second moment: their centre is the mean of d, taken in
pass 1, so each base costs two passes. Results agree with the chunked backend to fp32 rounding.

Everything after the passes (the losses, the backward's row statistics) is `torch_backend.finalize`
on the (N, stats.PARTIAL) layout, and the backward is `torch_backend.gradient` of the whole row in one
compiled call, writing the gradient in the logits' dtype directly (no fp32 N x V temporary).

Compilation: `torch.compile(dynamic=True)`, once per structural variant (which bases carry weight,
cross-entropy or not, the dtypes, the loss spec for the backward) and not per shape; Inductor caches
the C++ on disk, so a new process pays seconds less. Our own recompile limit is raised around these
calls and hitting it is an error, never a silent eager run of the whole-row code (which would
materialise N x V temporaries); where no C++ compiler is found, `available()` is False and "auto" keeps
the chunked backend.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional, Tuple

import torch

from ..contract import LossSpec
from . import stats as st
from . import torch_backend
from .torch_backend import LOG2E, _compute_dtype, finalize

# Rows whose second moments cancel more than this factor (F above) are redone by the chunked backend.
_MAX_CANCELLATION = 16.0
_RECOMPILE_LIMIT = 256
# Inductor stores an intermediate that several reductions read, or that reads many buffers, as an
# N x V buffer of its own; here every intermediate is cheap to recompute and must never be stored.
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 1 << 10, "realize_opcount_threshold": 1 << 10,
                     "realize_acc_reads_threshold": 1 << 10}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Inductor can build C++ here (a compiler it can find, and a CPU codegen that works)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # no compiler found (or an Inductor without this helper)
        warnings.warn(f"csd_kernels: Inductor's C++ backend is unavailable ({type(error).__name__}: {error}); "
                      "the CPU uses the chunked PyTorch backend", RuntimeWarning, stacklevel=2)
        return False
    return True


def _compiled(fn):
    """fn under torch.compile(dynamic=True), wrapped on first use (importing this module compiles
    nothing), with our recompile limit and no silent eager fallback."""
    compiled = []

    @functools.wraps(fn)
    def call(*args):
        import torch._dynamo.config as dynamo

        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS))
        with dynamo.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return compiled[0](*args)

    return call


def _safe(m):  # a row without any valid entry keeps m = -inf; exponents are then taken around 0
    return torch.where(m == -math.inf, 0.0, m)


# The bases of `_passes`, along a middle axis (N, B, V) of the row: S, T, U and the cross-entropy's
# softmax (every finite student entry, temperature 1), each only where the loss needs it. One
# broadcast expression serves every base, so Inductor generates one loop nest: rows, bases, and the
# three passes over the row, which stays in cache between passes and bases.
S, T, U, CE = 0, 1, 2, 3
M, CENTRE, Z, S1, S2, COUNT = range(6)  # the per-base columns of `_passes`


def _passes_impl(student, teacher, bases, scales, second):
    """The passes over (N, V) logits -> (N, len(bases), 6): per base (m, c, Z, S1, S2, n), with m
    the maximum of its logits over its entries (0 for U), c its centre, p = exp2((x - m) * scale) (1
    for U) and e = d - c: Z = sum p, S1 = sum p e, S2 = sum p e^2 (0 unless `second`; KL needs none),
    and n its number of entries. Without `second` the centre is the mean of d, taken in the first pass
    beside the maxima, so that each base costs two passes instead of three."""
    dtype = _compute_dtype(student, teacher)
    s, t = student.to(dtype)[:, None, :], teacher.to(dtype)[:, None, :]
    code = torch.tensor(bases, device=student.device)[None, :, None]
    scale = torch.tensor(scales, dtype=dtype, device=student.device)[None, :, None]
    finite_s = s != -math.inf
    valid = torch.where(code == CE, finite_s, finite_s & (t != -math.inf))
    x = torch.where(code == T, t, torch.where(code == U, 0.0, s))
    d = torch.where(valid, s - t, 0.0)
    top = torch.where(valid, x, -math.inf).amax(-1, keepdim=True)
    count = valid.to(dtype).sum(-1, keepdim=True)  # a float sum: an int64 one would split the loop nest
    if second:
        # The centre: d at the mode (the mean over ties; for U every entry ties: the mean of d), as a
        # masked sum rather than an argmax and a gather, which would split the loop nest.
        mode = valid & (x == top)
        centre = torch.where(mode, d, 0.0).sum(-1, keepdim=True) / mode.to(dtype).sum(-1, keepdim=True).clamp_min(1.0)
    else:  # only means are needed, and any centre within the spread of d keeps them precise
        centre = d.sum(-1, keepdim=True) / count.clamp_min(1.0)
    p = torch.where(valid, torch.exp2((x - _safe(top)) * scale), 0.0)
    e = torch.where(valid, d - centre, 0.0)
    pe = p * e
    second_moment = (pe * e).sum(-1, keepdim=True) if second else torch.zeros_like(centre)
    top = torch.where(code == U, 0.0, top)
    return torch.cat([top, centre, p.sum(-1, keepdim=True), pe.sum(-1, keepdim=True), second_moment, count],
                     dim=-1)


def _gradient_impl(student, teacher, stats, active, labels, grad_rows, out, spec, sharded_labels):
    dtype = stats.dtype
    vocab = student.shape[-1]
    g = torch_backend.gradient(student.to(dtype), teacher.to(dtype), 0, vocab, vocab, stats, active, labels,
                               grad_rows, spec, sharded_labels)
    out.copy_(g)  # Inductor stores into `out` directly, in its dtype
    return out


_passes = _compiled(_passes_impl)
_gradient = _compiled(_gradient_impl)


def _rows(x: torch.Tensor, n_rows: int) -> Optional[torch.Tensor]:
    """x as (N, V) rows with unit stride along V (sharing x's storage), or None where that needs a copy.

    Detached: not a view, so that Dynamo does not guard (and recompile) on the view's base shape."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        return None
    try:
        return x.view(n_rows, x.shape[-1]).detach()
    except RuntimeError:
        return None


def partials(student: torch.Tensor, teacher: torch.Tensor, active: torch.Tensor,
             labels: Optional[torch.Tensor], spec: LossSpec) -> torch.Tensor:
    """The (N, stats.PARTIAL) row statistics of these columns, as `torch_backend.partials` gives them."""
    n_rows = active.numel()
    s, t = _rows(student, n_rows), _rows(teacher, n_rows)
    if s is None or t is None or n_rows == 0:  # a layout that only a copy would make rows of
        return torch_backend.partials(student, teacher, active, labels, spec)
    bases = tuple(b for b in (S, T, U) if spec.needs(b)) + ((CE,) if spec.has_ce else ())
    scales = tuple((LOG2E / spec.temperature, LOG2E / spec.teacher_temperature, 0.0, LOG2E)[b] for b in bases)
    csd = spec.kind == "csd"  # the KL divergences need no second moments
    sums = _passes(s, t, bases, scales, csd)
    at = {b: sums[:, i] for i, b in enumerate(bases)}
    out = torch.zeros(n_rows, st.PARTIAL, dtype=sums.dtype, device=student.device)
    shift = at[spec.lead_base][:, CENTRE]  # the lead base's centre is the row's shift c
    out[:, st.P_SHIFT] = shift
    out[:, st.P_N] = sums[:, 0, COUNT]  # the first base is S, T or U: its entries are the row's
    redo = torch.zeros(n_rows, dtype=torch.bool)
    for b, column in ((S, st.P_S), (T, st.P_T), (U, st.P_U)):
        if b not in at:
            if b != U:
                out[:, column] = -math.inf
            continue
        m, centre, z, s1, s2, _ = at[b].unbind(-1)
        mean = s1 / torch.where(z > 0, z, 1.0)  # E_B[d - c_B]
        m2 = torch.where(z > 0, s2 - s1 * mean, 0.0)
        m2 = torch.where(m2 < 0, 0.0, m2)  # rounding; `where` keeps NaN
        if csd:  # F = S2 Z / (S2 Z - S1^2) > 16: the second moment cancels (False for NaN, empty rows)
            redo |= _MAX_CANCELLATION * s1 * s1 > (_MAX_CANCELLATION - 1.0) * s2 * z
        mu = (centre - shift) + mean  # E_B[d - c] around the row's shift: (c_B - c) + E_B[d - c_B]
        if b != U:
            out[:, column], out[:, column + 1], out[:, column + 2], out[:, column + 3] = m, z, mu, m2
        else:
            out[:, column], out[:, column + 1] = mu, m2
    if CE in at:
        out[:, st.P_CE], out[:, st.P_CE + 1] = at[CE][:, M], at[CE][:, Z]
    else:
        out[:, st.P_CE] = -math.inf
    # The rows that cancelled: the chunked backend's Chan updates (exact; these rows only, no compilation).
    rows = redo.nonzero().squeeze(1)  # CPU tensors: no device to synchronise with
    if rows.numel():
        out[rows] = torch_backend.partials(s[rows], t[rows], active[rows], None, spec)
    return out


def forward(student, teacher, active, labels, spec: LossSpec, components: bool = False
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """As `torch_backend.forward`: (total (N,), components or None, row statistics (N, NUM_STATS))."""
    return finalize(partials(student, teacher, active, labels, spec), student, active, labels, spec, components)


def backward(student, teacher, active, labels, stats, grad_rows, spec: LossSpec,
             out: Optional[torch.Tensor] = None, sharded_labels: bool = False) -> torch.Tensor:
    """As `torch_backend.backward`: the gradient w.r.t. `student`, written into `out` when given."""
    n_rows = active.numel()
    s, t = _rows(student, n_rows), _rows(teacher, n_rows)
    target = torch.empty(student.shape, dtype=student.dtype, device=student.device) if out is None else out
    rows_out = _rows(target, n_rows)
    if s is None or t is None or rows_out is None or n_rows == 0:
        return torch_backend.backward(student, teacher, active, labels, stats, grad_rows, spec, out=out,
                                      sharded_labels=sharded_labels)
    # Per-row tensors contiguous (an expanded upstream gradient has stride 0): one compiled variant.
    row_labels = labels.reshape(n_rows, 1).contiguous() if spec.has_ce else None
    _gradient(s, t, stats.contiguous(), active.contiguous(), row_labels, grad_rows.reshape(n_rows).contiguous(),
              rows_out, spec, sharded_labels)
    return target
