"""The compiled CPU backend of `csd_loss` and `kl_loss` ("inductor"): the row statistics of `stats.py` in
closed form over whole rows, the forward's passes and the backward in hand-vectorised C++ (`cpu_rows.cpp`).

Why a second PyTorch backend: on a CPU the chunked backend (`torch_backend.py`) runs some forty small
eager ops per chunk, each a pass through memory, and is about 5x slower than `torch.compile` of a naive
KL. Over whole rows, the same statistics are a few sweeps per row, and the row stays in the core's L2
cache between sweeps. Nothing of size N x V is materialised besides the gradient itself.

The forward is one call of `cpu_rows.cpp` (an OpenMP loop over rows). For every base the loss needs
(S: x = s, T: x = t, U: x = 0, and the cross-entropy's softmax: x = s over every finite s, temperature
1) it computes, in two or three sweeps of the row shared by all bases,

    1:  the maximum m_B of x over the base's entries (and n and the sum of d), and where it lies: each
        vector lane keeps d at its largest x and whether another entry tied it;
    2:  the centre c_B: d at the mode, found by sweep 1 where the mode is one entry; the mean of d over
        the entries where x = m_B in a sweep of its own where it is tied (for U, and for the KL
        divergences, which need no second moment, the mean of d);
    3:  with p = exp2((x - m_B) log2(e) / tau_B) (1 for U) and e = d - c_B on the base's entries:
        Z_B = sum p, S1_B = sum p e, S2_B = sum p e^2 (the cross-entropy needs Z alone).

    Then E_B[d - c_B] = S1 / Z and M2_B = S2 - S1^2 / Z.

The last subtraction cancels when the base's mean lies far from its centre compared with its spread:
the relative error of M2 is about F * 2^-24 with F = S2 Z / (S2 Z - S1^2). F is small for most rows (at
the mode of a peaked distribution F ~ 1; a flat one has its mode within a few spreads of the mean). A
row where F > 16 for any base is taken once more (those rows only, sweeps 1 and 3) around each base's
mean from the first pass, c_B + S1 / Z, where F is 1 up to the rounding of that mean; a row that still
cancels (none seen) is redone by the chunked backend's exact streaming pass. Results agree with the
chunked backend to fp32 rounding. float64 logits take the chunked backend's forward (the sweeps compute
in fp32).

Everything after the passes (the losses, the backward's row statistics) is `torch_backend.finalize`
on the (N, stats.PARTIAL) layout, and the backward is `torch_backend.gradient`'s formula, entry by entry
in `cpu_rows.cpp` over whole rows (one read of s and t, one write), the gradient in the logits' dtype
(no fp32 N x V temporary). Measured on 2 cores at N = 2048, V = 32000 fp32: about 33 ms for "ss" and 49
for "ts" into a gradient already in memory; a fresh gradient's first-touch page faults on 4 KB pages cost
some 85 ms more. So a new gradient of 2 MB or more is mapped on transparent huge pages (`cpu_rows.cpp`,
`huge_page_empty`: 512 times fewer faults). Measured at N = 2048, V = 151936 fp32 ("ss", 2 cores, THP
mode "madvise"): 320k faults and 460-570 ms per backward on 4 KB pages, 600 faults and 230-300 ms on
2 MB pages (both with occasional spikes of a second or more, the host's, in system time). When the
gradient is freed its mapping is kept, one at most, for the next backward of about its size (a
training step frees its logits' gradient and the next asks for the same): that backward finds its
pages in place and pays no faults at all. `empty_cache()` unmaps it. torch's own buffers get huge
pages with THP_MEM_ALLOC_ENABLE=1 (`benchmarks.cpu_target` reports the ratios both ways).

Compilation: `cpu_rows.cpp` is built once per machine by `torch.utils.cpp_extension` (about 45 s on 2
cores, then loaded from torch's extension cache). float64 logits take the chunked forward and the same
backward formula under `torch.compile(dynamic=True)`, once per structural variant (the loss spec) and
not per shape, cached on disk by Inductor (as does the top-k backend, `topk_inductor.py`). Our own
recompile limit is raised around these calls and hitting it is an error, never a silent eager run
of the whole-row code (which would materialise N x V temporaries); where no C++ compiler is found or
the row passes do not build, `available()` is False and "auto" keeps the chunked backend.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional, Tuple

import torch

from ..contract import LossSpec
from . import stats as st
from . import torch_backend
from .torch_backend import LOG2E, _compute_dtype, finalize

# Rows whose second moments cancel more than this factor (F above) are taken again around their means.
_MAX_CANCELLATION = 16.0
_RECOMPILE_LIMIT = 256
# Inductor stores an intermediate that several reductions read, or that reads many buffers, as an
# N x V buffer of its own; here every intermediate is cheap to recompute and must never be stored.
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 1 << 10, "realize_opcount_threshold": 1 << 10,
                     "realize_acc_reads_threshold": 1 << 10}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the compiled CPU backend works here: a C++ compiler that Inductor finds (for the float64
    backward and the top-k backend) and the row passes built (`cpu_rows.cpp`; the first call on a machine
    builds it)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # no compiler found (or an Inductor without this helper)
        warnings.warn(f"csd_kernels: Inductor's C++ backend is unavailable ({type(error).__name__}: {error}); "
                      "the CPU uses the chunked PyTorch backend", RuntimeWarning, stacklevel=2)
        return False
    return _extension() is not None


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


# The bases of the forward's row passes (`cpu_rows.cpp`): S, T, U and the cross-entropy's softmax (every
# finite student entry, temperature 1), each only where the loss needs it; and the columns it returns.
S, T, U, CE = 0, 1, 2, 3
M, CENTRE, Z, S1, S2, COUNT = range(6)

# at::vec picks its instructions from these macros when the module is compiled; the flags are those
# Inductor builds its own kernels with for the CPU capability torch reports.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


@functools.lru_cache(maxsize=None)
def _extension():
    """The compiled `cpu_rows.cpp` (built once per machine and CPU capability, then loaded from
    torch's extension cache), or None with a warning where it does not build."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp"] + _ISA_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
    try:
        return load(f"csd_kernels_cpu_rows_{capability.lower()}",
                    [os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_rows.cpp")],
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no ninja, a compiler that rejects the flags, ...
        warnings.warn(f"csd_kernels: the CPU row passes (cpu_rows.cpp) did not build ({type(error).__name__}: "
                      f"{error}); the CPU uses the chunked PyTorch backend", RuntimeWarning, stacklevel=3)
        return None


def _passes(student, teacher, bases, scales, second, centres=None):
    """(N, V) logits -> (N, len(bases), 6): per base (m, c, Z, S1, S2, n), as `cpu_rows.cpp` defines them;
    `centres` (N, len(bases)) float32, where given, are the c of S, T and U."""
    return _extension().row_passes(student, teacher, list(bases), list(scales), second, centres)


def _gradient_impl(student, teacher, stats, active, labels, grad_rows, out, spec, sharded_labels):
    dtype = stats.dtype
    vocab = student.shape[-1]
    g = torch_backend.gradient(student.to(dtype), teacher.to(dtype), 0, vocab, vocab, stats, active, labels,
                               grad_rows, spec, sharded_labels)
    out.copy_(g)  # Inductor stores into `out` directly, in its dtype
    return out


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
    # A layout that only a copy would make rows of, or float64 (the row passes compute in fp32).
    if s is None or t is None or n_rows == 0 or _compute_dtype(student, teacher) == torch.float64:
        return torch_backend.partials(student, teacher, active, labels, spec)
    bases = tuple(b for b in (S, T, U) if spec.needs(b)) + ((CE,) if spec.has_ce else ())
    scales = tuple((LOG2E / spec.temperature, LOG2E / spec.teacher_temperature, 0.0, LOG2E)[b] for b in bases)
    csd = spec.kind == "csd"  # the KL divergences need no second moments
    out, redo, centres = _partials_of(_passes(s, t, bases, scales, csd), bases, spec, csd)
    # Rows whose moments cancelled: once more around each base's mean from this pass (c_B + E_B[d - c_B],
    # where they cannot cancel but by rounding of that mean), and those that still do (none seen) by the
    # chunked backend's Chan updates (exact; these rows only, no compilation).
    rows = redo.nonzero().squeeze(1)  # CPU tensors: no device to synchronise with
    if rows.numel():
        again, still, _ = _partials_of(_passes(s[rows], t[rows], bases, scales, csd, centres[rows].contiguous()),
                                       bases, spec, csd)
        out[rows] = again
        rows = rows[still]
        if rows.numel():
            out[rows] = torch_backend.partials(s[rows], t[rows], active[rows], None, spec)
    return out


def _partials_of(sums, bases, spec: LossSpec, csd: bool):
    """The (N, stats.PARTIAL) row statistics from the row passes' columns, the rows whose second moments
    cancel (F > 16 for any base) and each base's mean (N, len(bases)), the centre to take them again."""
    n_rows = sums.shape[0]
    at = {b: sums[:, i] for i, b in enumerate(bases)}
    out = torch.zeros(n_rows, st.PARTIAL, dtype=sums.dtype, device=sums.device)
    shift = at[spec.lead_base][:, CENTRE]  # the lead base's centre is the row's shift c
    out[:, st.P_SHIFT] = shift
    out[:, st.P_N] = sums[:, 0, COUNT]  # the first base is S, T or U: its entries are the row's
    redo = torch.zeros(n_rows, dtype=torch.bool)
    means = sums[..., CENTRE].clone()
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
        means[:, bases.index(b)] = centre + mean
        mu = (centre - shift) + mean  # E_B[d - c] around the row's shift: (c_B - c) + E_B[d - c_B]
        if b != U:
            out[:, column], out[:, column + 1], out[:, column + 2], out[:, column + 3] = m, z, mu, m2
        else:
            out[:, column], out[:, column + 1] = mu, m2
    if CE in at:
        out[:, st.P_CE], out[:, st.P_CE + 1] = at[CE][:, M], at[CE][:, Z]
    else:
        out[:, st.P_CE] = -math.inf
    return out, redo, means


def forward(student, teacher, active, labels, spec: LossSpec, components: bool = False
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """As `torch_backend.forward`: (total (N,), components or None, row statistics (N, NUM_STATS))."""
    return finalize(partials(student, teacher, active, labels, spec), student, active, labels, spec, components)


# A gradient at least this large is mapped on transparent huge pages (cpu_rows.cpp, huge_page_empty): one
# 2 MB page's worth, below which there is nothing to gain.
_HUGE_PAGE_BYTES = 2 << 20


def _new_gradient(student: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of the student's shape and dtype for the gradient (contiguous): from 2 MB
    on, a huge-page mapping, the one the last freed gradient left (kept for reuse) where it fits."""
    if student.numel() * student.element_size() >= _HUGE_PAGE_BYTES and _extension() is not None:
        return _extension().huge_page_empty(list(student.shape), student.dtype)
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def empty_cache() -> None:
    """Return to the system the memory of the CPU backward's last freed gradient, which it keeps for the
    next backward of about its size (as `torch.cuda.empty_cache` does for the CUDA caching allocator):
    one mapping at most, of the gradient's size rounded up to 2 MB. Nothing to do on a GPU."""
    if _extension.cache_info().currsize and _extension() is not None:  # never builds the extension
        _extension().release_cached_gradient()


def backward(student, teacher, active, labels, stats, grad_rows, spec: LossSpec,
             out: Optional[torch.Tensor] = None, sharded_labels: bool = False) -> torch.Tensor:
    """As `torch_backend.backward`: the gradient w.r.t. `student`, written into `out` when given."""
    n_rows = active.numel()
    s, t = _rows(student, n_rows), _rows(teacher, n_rows)
    target = _new_gradient(student) if out is None else out
    rows_out = _rows(target, n_rows)
    if s is None or t is None or rows_out is None or n_rows == 0:
        return torch_backend.backward(student, teacher, active, labels, stats, grad_rows, spec, out=out,
                                      sharded_labels=sharded_labels)
    if stats.dtype == torch.float32:  # the C++ backward of `cpu_rows.cpp`
        row_labels = labels.reshape(n_rows).long().contiguous() if spec.has_ce else None
        _extension().row_gradient(s, t, stats.contiguous(), active.reshape(n_rows).contiguous(), row_labels,
                                  grad_rows.reshape(n_rows).float().contiguous(), rows_out, spec.kind_code,
                                  list(spec.w1), list(spec.w2), spec.temperature, spec.teacher_temperature,
                                  spec.csd_weight, spec.ce_weight, sharded_labels)
        return target
    # float64: the same formula compiled by Inductor. Per-row tensors contiguous (an expanded upstream
    # gradient has stride 0): one compiled variant.
    row_labels = labels.reshape(n_rows, 1).contiguous() if spec.has_ce else None
    _gradient(s, t, stats.contiguous(), active.contiguous(), row_labels, grad_rows.reshape(n_rows).contiguous(),
              rows_out, spec, sharded_labels)
    return target
