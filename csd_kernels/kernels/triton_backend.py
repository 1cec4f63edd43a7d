"""Triton kernels for `csd_loss` and `kl_loss`: one streaming pass over the vocabulary forward, one backward.

The maths (moments of d = s - t under the base distributions S, T, U, merged online, and CSD, KL(T||S)
and KL(S||T) as functions of them) is derived in `stats.py`. The constexpr LOSS selects the loss
(0 CSD, 1 forward KL, 2 reverse KL); NEED_S/T/U select the base distributions; CE adds the fused
hard-label cross-entropy (one more running log-sum-exp, one load of s[label] per row). Here:

    forward   grid (N, P): program (row, p) streams columns [p * cols, (p + 1) * cols) of one row in
              BLOCK-wide chunks, each a (SUB, LANES, VEC) tile of which every thread (lane) owns 16-byte
              runs. Each lane keeps its own online softmax moments for S and/or T and plain moments for
              U, around its own shift, in registers; the lanes merge once after the row (no shared
              memory or barrier in the loop). P == 1 (many rows): the program finalises the row itself
              (loss + 10 statistics).
              P > 1 (few rows, long vocabulary): it writes 14 partial statistics and `_merge_kernel`
              (grid (N,)) merges the P partials of each row. Deterministic: fixed merge order, no atomics.
    raw       `_fwd_raw_kernel` replaces the forward above by a cheaper pass (split or not; see "The raw
              forward" below); it and `_fwd_kernel` then recompute only the rows it flags.
    backward  grid (N, cdiv(V, BLOCK)): each program recomputes S(k), T(k), U(k) for one block from the
              row statistics and writes grad_rows[row] times the loss's gradient, for CSD
              1/2 (w2 (d - E_w1) + w1 (d - E_w2)). Rows not 16-byte aligned (PEEL, below): two
              grids, the interior blocks without a mask, then each row's edge blocks.

Bytes moved per vocabulary element, bf16 inputs: forward reads s and t (4 B), backward reads s and t
and writes the gradient (6 B): 10 B in all, the floor the benchmarks compare against. Statistics are
O(N) fp32. Excluded rows cost one load of their `active` flag (plus, backward, writing zeros).

The raw forward. The exact forward above folds every 16-entry tile into each lane's centred moments
(a running maximum, Chan's update, a second sweep for M2): about 9 instructions per entry per softmax
base, which makes a two-softmax forward issue-bound below the H200's bandwidth. The raw pass fixes, from
the range's first block with a valid entry, the shift c (as above) and for each softmax a reference r,
the block's largest logit, and keeps per-entry sums p, p (d - c) and p (d - c)^2 with
p = 2^((x - r) / tau'), one FADD or FFMA each, predicated on the entry's validity so that neither the
logits nor d need a mask (5 instructions per entry per base with its exponential; d and d^2 once for
all bases); threads and entries are summed after the row, one warp a row. Then
E_B = S1 / Z and M2_B = S2 - S1^2 / Z, which cancels where E_B lies far from c compared with the spread:
the rounding of the loss is about 2^-24 times bound = sum_B (a1_B + a2_B) S2_B / Z_B, against 4 * loss
(for the KL divergences CSD's "st" loss, Var_S + Var_T + (E_S - E_T)^2, the spread the exact pass's
rounding of E_S and E_T scales with). A row is kept when bound <= MAX_CANCELLATION * 4 * loss, its
sums are finite and it has a valid entry. Around c' = c + E_w1 the bound is 4 * loss exactly (the
parallel-axis identity over the mixture), so a row that fails only the bound takes a second raw pass
around c' (flag 1; `_fwd_raw_kernel` with RETRY). A row whose sums are not finite (a logit so far above
the first block's maximum that an exponential overflows, or a NaN, which the exact pass propagates) or
that has no valid entry goes to the exact forward (flag 2; `_fwd_kernel` with REDO). Split rows are
judged after `_merge_kernel` merges their raw partials, and any row it flags goes to the exact split
forward and merge. Rows that do not start 16-byte aligned (an odd V such as GPT-2's 50257) are tiled
from the aligned address before each row (PEEL, where s and t lie equally far past one): the blocks
inside the range load in 128 bits, the first and last are masked entry by entry to the range. The
backward does the same where s, t and the gradient lie equally far past one: an interior grid of the
blocks that lie inside every row (128-bit loads and stores, no mask), then a grid of the edge blocks.

Which rows fail the bound depends on the data: c is d at the first block's mode, and a peaked w1 puts
E_w1 at its mode's d, wherever that lies. `benchmarks/flag_rate.py` evaluates this test in float64 on
synthetic rows (a teacher ~ N(0, 2^2) plus a peak at a random id, student = teacher + noise): none for
a flat teacher, and up to 50 % at a mean top-1 probability of 0.91 and 90 % at 0.997 ("ts", "st",
"tt", "ss"; "us" none, its w1 is U; benchmarks/results/flag_rate.csv). Those rows cost a second read
of s and t. The GPU-validation issue should measure the flag rate on a real teacher's logits.

Softmax exponentials use exp2 with log2(e) / temperature folded into one per-row constant, so each
element costs one FMA and one exp2 per base distribution.

Limits: the vocabulary dimension must have stride 1 (the launcher copies a tensor whose last dim is
strided, which is rare); leading dims may have any strides as long as they collapse into at most two
(e.g. `logits[:, :-1]`), otherwise the launcher copies. Row offsets are int64 (N * V passes 2^31 at
N = 16384, V = 151936).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..contract import LossSpec
from . import stats as st

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
STATS = tl.constexpr(16)  # row stride of the statistics buffer: stats.NUM_STATS (columns there)
# A partial row statistic (stats.P_*): shift, (m, Z, mu, M2) of S, the same of T, (n, mu, M2) of U,
# (m, Z) of the cross-entropy's softmax, the vocabulary-parallel label columns.
PARTIAL = tl.constexpr(16)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _quotient(x, y, NATIVE: tl.constexpr):
    # x / y for the forward's per-tile fold (two per tile and base: the tile's mean, Chan's share). On a
    # GPU div.approx.ftz.f32, MUFU.RCP and a multiply (within 2 ulp), where `/` is div.full.f32 with range
    # fix-ups (eight SASS instructions). Its limits do not bite: every y is a lane's mass, at least 1
    # once the lane holds an entry (its maximum weighs exp(0)), a tile's, kept off the subnormal range by
    # the caller, or a count.
    if NATIVE:
        return tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return x / y


@triton.jit
def _row_offset(row, L1, stride_outer, stride_inner):
    # Leading dims are collapsed to (N // L1, L1) so that slices like logits[:, :-1] need no copy.
    return (row // L1) * stride_outer + (row % L1) * stride_inner


@triton.jit
def _row_base(ptr, row, L1, stride_outer, stride_inner):
    return ptr + _row_offset(row, L1, stride_outer, stride_inner)


@triton.jit
def _peel_block(offset, first_edge, V, BLOCK: tl.constexpr, VEC: tl.constexpr, PEEL: tl.constexpr,
                MASKED: tl.constexpr):
    # A backward program's block of its row (grid axis 1; the row starts at `offset`): (offs, mis,
    # in_range), the block's columns from the row's tile base (entry offs - mis) and their range mask.
    # PEEL (rows that do not start 16-byte aligned, as in the raw forward): the row is tiled from the
    # aligned address before it, `mis` entries early, and the launcher runs two grids (`peel_grids`):
    # the interior blocks 1 .. first_edge - 1, which lie inside every row and move in 128 bits without
    # a mask (MASKED False), then the edges, block 0 and the blocks from first_edge on, masked entry by
    # entry to the row. Otherwise one grid of blocks from the row's start, masked to V.
    block = tl.program_id(1)
    mis = tl.zeros([], tl.int32)
    if PEEL:
        mis = (offset % VEC).to(tl.int32)
        if MASKED:
            block = tl.where(block == 0, 0, first_edge + block - 1)
        else:
            block += 1
    offs = block * BLOCK + tl.arange(0, BLOCK)
    if PEEL:
        in_range = (offs >= mis) & (offs < V + mis)
    else:
        in_range = offs < V
    return offs, mis, in_range


@triton.jit
def _peel_base(ptr, offset, mis, VEC: tl.constexpr, PEEL: tl.constexpr):
    # A row's tile base (`_peel_block`): 16-byte aligned under PEEL, which Triton is told.
    if PEEL:
        offset = tl.multiple_of(offset - mis, VEC)
    return ptr + offset


@triton.jit
def _load_block(s_row, t_row, base, offs, stop, MASKED: tl.constexpr, NATIVE: tl.constexpr = False,
                WORDS: tl.constexpr = False, lo=0, EDGES: tl.constexpr = False, EDGE_WORDS: tl.constexpr = False):
    # Entries base + offs of both rows. Upcast right after the load: fp32 arithmetic everywhere (bf16
    # arithmetic is also wrong under the interpreter). Out-of-range lanes read -inf, i.e. they look like
    # masked vocabulary. Full blocks (MASKED False) need no range test.
    # An entry lies in the row unless s or t is -inf (a NaN is kept, so that it propagates): one test of
    # their minimum, which is exact in any dtype. NATIVE takes it in the logits' own dtype (two bf16
    # entries per instruction on a GPU); the interpreter cannot take a bf16 minimum. EDGES (a masked
    # block of a peeled row, see _fwd_raw_kernel): the range is [lo, stop), which need not fall on words,
    # so such a block loads entry by entry (a word across the last row's end would read past the
    # tensor), or, EDGE_WORDS (the launcher checked that the storage holds that word), in whole words
    # whose halves outside the range are then set to -inf.
    if WORDS and MASKED and EDGES and not EDGE_WORDS:  # the word layout's entries, as entries
        shape: tl.constexpr = [offs.shape[0], offs.shape[1], 2 * offs.shape[2]]
        cols = base + tl.join(2 * offs, 2 * offs + 1).reshape(shape)
        in_range = (cols >= lo) & (cols < stop)
        s = tl.load(s_row + cols, mask=in_range, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=in_range, other=float("-inf")).to(tl.float32)
        valid = tl.minimum(s, t) != float("-inf")
    elif WORDS:
        # bf16 rows as 32-bit words (offs: word offsets of a (SUB, LANES, VEC // 2) tile), each word
        # unpacked into its two entries with one shift or one AND (Triton's bf16 -> fp32 conversion
        # costs two instructions for the high half); -8323200 is the word 0xFF80FF80, two bf16 -infs.
        s_words = (s_row + base).to(tl.pointer_type(tl.int32)) + offs
        t_words = (t_row + base).to(tl.pointer_type(tl.int32)) + offs
        if MASKED:
            in_range = base + 2 * offs < stop  # rows of whole words (V even)
            if EDGES:  # the words with an entry in [lo, stop)
                in_range = in_range & (base + 2 * offs + 1 >= lo)
            w_s = tl.load(s_words, mask=in_range, other=-8323200)
            w_t = tl.load(t_words, mask=in_range, other=-8323200)
        else:
            w_s = tl.load(s_words)
            w_t = tl.load(t_words)
        shape: tl.constexpr = [offs.shape[0], offs.shape[1], 2 * offs.shape[2]]
        s = tl.join((w_s << 16).to(tl.float32, bitcast=True),
                    (w_s & -65536).to(tl.float32, bitcast=True)).reshape(shape)
        t = tl.join((w_t << 16).to(tl.float32, bitcast=True),
                    (w_t & -65536).to(tl.float32, bitcast=True)).reshape(shape)
        if MASKED and EDGES:  # a word's half outside the range: -inf (the fused CE sums every finite s)
            cols = base + tl.join(2 * offs, 2 * offs + 1).reshape(shape)
            inside = (cols >= lo) & (cols < stop)
            s = tl.where(inside, s, float("-inf"))
            t = tl.where(inside, t, float("-inf"))
        valid = tl.minimum(s, t) != float("-inf")
    else:
        cols = base + offs
        if MASKED:
            in_range = cols < stop
            if EDGES:
                in_range = in_range & (cols >= lo)
            s = tl.load(s_row + cols, mask=in_range, other=float("-inf"))
            t = tl.load(t_row + cols, mask=in_range, other=float("-inf"))
        else:
            s = tl.load(s_row + cols)
            t = tl.load(t_row + cols)
        if NATIVE:
            valid = tl.minimum(s, t) != float("-inf")
        s = s.to(tl.float32)
        t = t.to(tl.float32)
        if not NATIVE:
            valid = tl.minimum(s, t) != float("-inf")
    return s, t, valid


# The forward's tile: (SUB, LANES, VEC) entries, lane j owning VEC contiguous entries (16 bytes: one
# 128-bit load) in each of SUB rows. Both reduced axes (0 and 2) lie inside one thread, so a lane's
# statistics, tl.sum(tl.sum(x, axis=2), axis=0), are plain register arithmetic, and v[None, :, None]
# broadcasts a lane's value over its entries; lanes merge once, after the row (no shared memory or
# barrier in the loop). These are written out rather than wrapped in helpers because the interpreter
# pays about 0.3 ms for every call of a jit function.
@triton.jit
def _fold(mu, m2, z_old, z_tile, mu_tile, m2_tile, MOMENTS: tl.constexpr, NATIVE: tl.constexpr):
    # Chan et al.'s pairwise update: a tile (total z_tile, mean mu_tile, M2 around its own mean) into a
    # lane's running (z_old, mu, m2) (stats.py). Neither a far shift nor drift along the row cancels.
    z_new = z_old + z_tile
    z_safe = tl.where(z_new > 0.0, z_new, 1.0)
    share = tl.where(z_new > 0.0, _quotient(z_tile, z_safe, NATIVE), 0.0)
    delta = mu_tile - mu
    mu = mu + delta * share
    if MOMENTS >= 2:
        m2 = m2 + m2_tile + delta * delta * z_old * share
    return z_new, mu, m2


@triton.jit
def _softmax_tile(x, dd, scale, m, z, mu, m2, MOMENTS: tl.constexpr, NATIVE: tl.constexpr,
                  EXACT: tl.constexpr = False):
    # One tile into each lane's online softmax moments around its raw maximum m (stats.py). x: logits
    # (-inf outside the row), dd = d - c (0 outside), scale = log2(e) / temperature. An exponent is one
    # FMA, x * scale - r with r = fl(m * scale) and an exact product; `fix` = 2^(r - m * scale) then
    # takes the tile's sums to the raw maximum, so weights stay exact near the max at any |x|. EXACT
    # forms (x - m) * scale instead (one instruction more), which is exactly 0 at the maximum: the
    # cross-entropy of a one-entry row is then exactly 0.
    m_new = tl.maximum(m, tl.max(tl.max(x, axis=2), axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no entry yet: -inf - -inf
    if EXACT:
        p = tl.exp2((x - m_safe[None, :, None]) * scale)
        fix = 1.0
    else:
        r = m_safe * scale
        p = tl.exp2(tl.fma(x, scale, -r[None, :, None]))
        fix = tl.exp2(-tl.fma(m_safe, scale, -r))
    alpha = tl.exp2((m - m_safe) * scale)
    z_raw = tl.sum(tl.sum(p, axis=2), axis=0)
    mu_tile = mu
    m2_tile = m2
    if MOMENTS >= 1:
        # A tile far below the lane's maximum may hold subnormal mass; its mean then weighs nothing.
        z_safe = tl.where(z_raw >= FLT_MIN, z_raw, 1.0)
        s1 = tl.sum(tl.sum(p * dd, axis=2), axis=0)
        mu_tile = _quotient(s1, z_safe, NATIVE)
        if MOMENTS >= 2:  # the tile's M2 around its own mean: a second sweep over registers
            f = dd - mu_tile[None, :, None]
            m2_tile = tl.sum(tl.sum(p * f * f, axis=2), axis=0) * fix
    z, mu, m2 = _fold(mu, m2 * alpha, z * alpha, z_raw * fix, mu_tile, m2_tile, MOMENTS, NATIVE)
    return m_new, z, mu, m2


@triton.jit
def _fold_block(
    s, t, valid, c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1,
    s_scale, t_scale, a1_s, a1_t, a1_u,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, CE: tl.constexpr, MOMENTS: tl.constexpr,
    NATIVE: tl.constexpr,
):
    # One block into every lane's statistics, each lane around its own shift c (stats.py).
    dd = tl.where(valid, s - t - c[None, :, None], 0.0)
    if NEED_S:
        m_s, z_s, mu_s, m2_s = _softmax_tile(tl.where(valid, s, float("-inf")), dd, s_scale, m_s, z_s, mu_s, m2_s,
                                             MOMENTS, NATIVE)
    if NEED_T:
        m_t, z_t, mu_t, m2_t = _softmax_tile(tl.where(valid, t, float("-inf")), dd, t_scale, m_t, z_t, mu_t, m2_t,
                                             MOMENTS, NATIVE)
    if NEED_U:  # unit weights; n counts the valid entries (dd is 0 outside the row)
        # The tile's M2 from its raw sums around the lane's shift, which sits on the running mean: a
        # tile far from it moves Var_U by as much as the cancellation costs (unit weights cannot jump to
        # a far outlier as a softmax's mass can; test_mass_jumps_to_a_far_outlier), so no second sweep.
        n_tile = tl.sum(tl.sum(valid.to(tl.float32), axis=2), axis=0)
        s1 = tl.sum(tl.sum(dd, axis=2), axis=0)
        mu_tile = _quotient(s1, tl.maximum(n_tile, 1.0), NATIVE)
        m2_tile = tl.sum(tl.sum(dd * dd, axis=2), axis=0) - s1 * mu_tile
        # rounding may leave a tiny negative M2; `where` (unlike maximum) keeps a NaN
        n, mu_u, m2_u = _fold(mu_u, m2_u, n, n_tile, mu_tile, tl.where(m2_tile < 0.0, 0.0, m2_tile), 2,
                              NATIVE)
    # Move each lane's shift onto its running E_w1, exactly (TwoSum): the means stay small and precise
    # even when d drifts along the row.
    e_lead = _mix(a1_s, a1_t, a1_u, mu_s, mu_t, mu_u, NEED_S, NEED_T, NEED_U)
    c, residual = _two_sum(c, e_lead)
    mu_s = (mu_s - e_lead) + residual
    mu_t = (mu_t - e_lead) + residual
    mu_u = (mu_u - e_lead) + residual
    if CE:  # the usual cross-entropy: every finite student entry (-inf weighs 0), temperature 1
        m_1, z_1, _, _ = _softmax_tile(s, dd, LOG2E, m_1, z_1, z_1, z_1, 0, NATIVE, True)
    return c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1


@triton.jit
def _mass_share(m_p, z_p, scale):
    # Each part's (lane's or program's) share of one softmax's total mass (0 where unused or empty).
    m = tl.max(m_p, axis=0)
    w = tl.exp2((m_p - tl.where(m == float("-inf"), 0.0, m)) * scale) * z_p
    total = tl.sum(w, axis=0)
    return tl.where(total > 0.0, w / tl.where(total > 0.0, total, 1.0), 0.0)


@triton.jit
def _merge_moments(m_p, z_p, mu_p, m2_p, delta, scale):
    # Chan's parallel merge of P partial (m, Z, mu, M2), each around its own shift c_p, into one around
    # the row's shift c (delta = c_p - c).
    m = tl.max(m_p, axis=0)
    a = tl.exp2((m_p - tl.where(m == float("-inf"), 0.0, m)) * scale)
    w = a * z_p
    z = tl.sum(w, axis=0)
    x = mu_p + delta
    mu = tl.where(z > 0.0, tl.sum(w * x, axis=0) / tl.where(z > 0.0, z, 1.0), 0.0)
    m2 = tl.sum(a * m2_p + w * (x - mu) * (x - mu), axis=0)
    return m, z, mu, m2


@triton.jit
def _merge_parts(
    c_p, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n_p, mu_u, m2_u, m_1, z_1, index,
    s_scale, t_scale, a1_s, a1_t, a1_u, NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr,
    CE: tl.constexpr,
):
    # P parts of one row (the lanes of a program, or the programs of a split row), each around its own
    # shift c_p, merged in a fixed order around the shift of the part holding most of w1's mass (each
    # part's shift sits on its own E_w1), so that the merged means stay small where they must be precise.
    # An unused base's placeholders are reduced to scalars without a call.
    n = tl.sum(n_p, axis=0)
    share_s = n_p
    share_t = n_p
    if NEED_S:
        share_s = _mass_share(m_s, z_s, s_scale)
    if NEED_T:
        share_t = _mass_share(m_t, z_t, t_scale)
    lead = _mix(a1_s, a1_t, a1_u, share_s, share_t, n_p / tl.maximum(n, 1.0), NEED_S, NEED_T, NEED_U)
    first = tl.argmax(lead, axis=0)
    shift = tl.sum(tl.where(index == first, c_p, 0.0), axis=0)
    delta = c_p - shift
    x_u = mu_u + delta
    mu_u = tl.sum(n_p * x_u, axis=0) / tl.maximum(n, 1.0)
    m2_u = tl.sum(m2_u + n_p * (x_u - mu_u) * (x_u - mu_u), axis=0)
    if NEED_S:
        m_s, z_s, mu_s, m2_s = _merge_moments(m_s, z_s, mu_s, m2_s, delta, s_scale)
    else:
        m_s, z_s, mu_s, m2_s = tl.max(m_s, axis=0), tl.sum(z_s, axis=0), tl.sum(mu_s, axis=0), tl.sum(m2_s, axis=0)
    if NEED_T:
        m_t, z_t, mu_t, m2_t = _merge_moments(m_t, z_t, mu_t, m2_t, delta, t_scale)
    else:
        m_t, z_t, mu_t, m2_t = tl.max(m_t, axis=0), tl.sum(z_t, axis=0), tl.sum(mu_t, axis=0), tl.sum(m2_t, axis=0)
    if CE:
        m_1, z_1, _, _ = _merge_moments(m_1, z_1, z_1, z_1, delta, LOG2E)
    else:
        m_1, z_1 = tl.max(m_1, axis=0), tl.sum(z_1, axis=0)
    return shift, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1


@triton.jit
def _two_sum(a, b):
    # a + b == total + residual exactly (Knuth's TwoSum; no products, so no FMA contraction changes it).
    total = a + b
    b_part = total - a
    residual = (a - (total - b_part)) + (b - b_part)
    return total, residual


@triton.jit
def _tile_offsets(SUB: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                  WORDS: tl.constexpr):
    # Offsets of a (SUB, LANES, VEC) tile from its block's start (for _load_block).
    lane = tl.arange(0, LANES)
    if WORDS:  # as ALIGNED, in 32-bit words of two bf16 entries
        offs = (tl.arange(0, SUB) * (LANES * VEC // 2))[:, None, None] + (lane * (VEC // 2))[None, :, None] \
            + tl.arange(0, VEC // 2)[None, None, :]
    elif ALIGNED:  # lane j's VEC entries are contiguous: one 128-bit load each
        offs = (tl.arange(0, SUB) * (LANES * VEC))[:, None, None] + (lane * VEC)[None, :, None] \
            + tl.arange(0, VEC)[None, None, :]
    else:  # rows not 16-byte aligned (V = 50257) load entry by entry: keep lanes adjacent, so that the
        # compiler still gives each thread one lane (its loads coalesce across the warp)
        offs = (tl.arange(0, SUB) * (LANES * VEC))[:, None, None] + lane[None, :, None] \
            + (tl.arange(0, VEC) * LANES)[None, None, :]
    return offs


@triton.jit
def _first_shift(s, t, valid, count, LEAD: tl.constexpr):
    # The first shift c of a row (stats.py): d at the mode of w1's lead base (S: the largest s, T: the
    # largest t; the largest such d on a tie), or for U the mean of the valid d. Near E_w1, so the first
    # block's means are precise. One block-wide reduction per row.
    d = tl.where(valid, s - t, 0.0)
    if LEAD == 2:
        return tl.sum(tl.sum(tl.sum(d, axis=2), axis=0), axis=0) / tl.maximum(count, 1.0)
    x = tl.where(valid, s if LEAD == 0 else t, float("-inf"))
    mode = tl.max(tl.max(tl.max(x, axis=2), axis=0), axis=0)
    return tl.max(tl.max(tl.max(tl.where(x == mode, d, float("-inf")), axis=2), axis=0), axis=0)


@triton.jit
def _mix(a_s, a_t, a_u, v_s, v_t, v_u, NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr):
    # Only the bases the weighting uses enter, so an unused base's placeholder never reaches the sum.
    # U's term first: in the backward it is the row's constant a_u / n, so that each softmax base then
    # costs one FMA per entry.
    total = 0.0
    if NEED_U:
        total += a_u * v_u
    if NEED_S:
        total += a_s * v_s
    if NEED_T:
        total += a_t * v_t
    return total


@triton.jit
def _row_loss(
    shift, inv_n, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u,
    s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, LOSS: tl.constexpr,
):
    # A row's loss (unclamped), E_w1[d - c], E_w2[d - c] and log2 Z of S and T from its statistics.
    inv_temp = s_scale * LN2
    var_s = m2_s / z_s
    var_t = m2_t / z_t
    var_u = m2_u * inv_n
    e1 = _mix(a1_s, a1_t, a1_u, mu_s, mu_t, mu_u, NEED_S, NEED_T, NEED_U)
    e2 = _mix(a2_s, a2_t, a2_u, mu_s, mu_t, mu_u, NEED_S, NEED_T, NEED_U)
    log2z_s = tl.log2(z_s)
    log2z_t = tl.log2(z_t)
    if LOSS == 0:  # CSD; a mixture's variance without E[x^2] - E[x]^2 cancellation
        v1 = _mix(a1_s, a1_t, a1_u, var_s + (mu_s - e1) * (mu_s - e1), var_t + (mu_t - e1) * (mu_t - e1),
                  var_u + (mu_u - e1) * (mu_u - e1), NEED_S, NEED_T, NEED_U)
        v2 = _mix(a2_s, a2_t, a2_u, var_s + (mu_s - e2) * (mu_s - e2), var_t + (mu_t - e2) * (mu_t - e2),
                  var_u + (mu_u - e2) * (mu_u - e2), NEED_S, NEED_T, NEED_U)
        loss = 0.25 * (v1 + v2 + (e1 - e2) * (e1 - e2))
    elif LOSS == 1:  # KL(T || S); here w1 = S, w2 = T and log p_S - log p_T = d / tau - lse_S + lse_T
        loss = (((m_s - m_t) - shift) - e2) * inv_temp + (log2z_s - log2z_t) * LN2
    else:  # KL(S || T)
        loss = (e1 - ((m_s - m_t) - shift)) * inv_temp - (log2z_s - log2z_t) * LN2
    return loss, e1, e2, log2z_s, log2z_t


@triton.jit
def _finalize(
    row, N, V, s_row, labels_ptr, loss_ptr, comp_ptr, stats_ptr,
    shift, n, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u, m_1, z_1,
    s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, LOSS: tl.constexpr,
    CE: tl.constexpr, COMPONENTS: tl.constexpr,
):
    # Row statistics -> loss and what the backward needs (the maths is in stats.py).
    empty = n == 0.0
    inv_n = tl.where(empty, 0.0, 1.0 / tl.maximum(n, 1.0))
    loss, e1, e2, log2z_s, log2z_t = _row_loss(
        shift, inv_n, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u,
        s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, NEED_S, NEED_T, NEED_U, LOSS)
    # Rounding can leave a tiny negative variance; `where` (unlike maximum) keeps NaN visible.
    loss = tl.where(loss < 0.0, 0.0, loss)
    loss = tl.where(empty, 0.0, loss)
    total = csd_weight * loss
    stats_row = stats_ptr + row * STATS
    if CE:
        # An out-of-range label gives NaN (no host check on the hot path; see validate_labels).
        label = tl.load(labels_ptr + row).to(tl.int64)
        label_ok = (label >= 0) & (label < V)
        picked = tl.load(s_row + tl.where(label_ok, label, 0)).to(tl.float32)
        log2z_1 = tl.log2(z_1)
        # (max - s[label]) + log Z: exactly 0 for a one-entry row, and no large lse to round
        # (NaN written inline: as a global constexpr, Triton's check that a helper sees the same global
        # values in every kernel that calls it fails on NaN != NaN)
        ce = tl.where(label_ok, (m_1 - picked) + log2z_1 * LN2, float("nan"))
        total += ce_weight * ce
        tl.store(stats_row + 8, m_1)
        tl.store(stats_row + 9, log2z_1)
        if COMPONENTS:
            tl.store(comp_ptr + N + row, ce)
    if COMPONENTS:
        tl.store(comp_ptr + row, loss)
        if not CE:
            tl.store(comp_ptr + N + row, 0.0)
    tl.store(loss_ptr + row, total)
    tl.store(stats_row + 0, m_s)
    tl.store(stats_row + 1, log2z_s)
    tl.store(stats_row + 2, m_t)
    tl.store(stats_row + 3, log2z_t)
    # The backward forms d - c - E_w1[d - c] per entry; re-centre c on E_w1 first (stats.py).
    e1 = tl.where(empty, 0.0, e1)
    e2 = tl.where(empty, 0.0, e2)
    centre, residual = _two_sum(shift, e1)
    tl.store(stats_row + 4, residual)
    tl.store(stats_row + 5, (e2 - e1) + residual)
    tl.store(stats_row + 6, centre)
    tl.store(stats_row + 7, inv_n)


@triton.jit
def _store_excluded_row(row, N, loss_ptr, comp_ptr, COMPONENTS: tl.constexpr):
    tl.store(loss_ptr + row, 0.0)
    if COMPONENTS:
        tl.store(comp_ptr + row, 0.0)
        tl.store(comp_ptr + N + row, 0.0)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    # pointers
    s_ptr, t_ptr, labels_ptr, active_ptr, part_ptr, loss_ptr, comp_ptr, stats_ptr,
    # shapes
    N, V, L1, cols_per_program,
    # strides (the vocabulary stride is 1)
    s_so, s_si, t_so, t_si,
    # log2(e) / temperature and log2(e) / teacher_temperature
    s_scale, t_scale,
    # weighting: (S, T, U) coefficients of w1 and w2; weights of the loss and the cross-entropy
    a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, LOSS: tl.constexpr,
    CE: tl.constexpr, COMPONENTS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
    LEAD: tl.constexpr, SUB: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, NATIVE: tl.constexpr,
    ALIGNED: tl.constexpr, WORDS: tl.constexpr, REDO: tl.constexpr = False,
):
    # REDO: the exact pass over the rows `_fwd_raw_kernel` flagged (active_ptr is its redo flags); the
    # other rows are already written.
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if tl.load(active_ptr + row) == 0:
        if not SPLIT and not REDO:
            _store_excluded_row(row, N, loss_ptr, comp_ptr, COMPONENTS)
        return  # with SPLIT the merge kernel never reads an excluded row's partials

    s_row = _row_base(s_ptr, row, L1, s_so, s_si)
    t_row = _row_base(t_ptr, row, L1, t_so, t_si)
    start = part * cols_per_program
    stop = tl.minimum(start + cols_per_program, V)
    lane = tl.arange(0, LANES)
    offs = _tile_offsets(SUB, LANES, VEC, ALIGNED, WORDS)

    # per-lane fp32 zeros, in the layout of the tile's lane reductions
    zero = tl.sum(tl.sum(tl.zeros([SUB, LANES, VEC], tl.float32), axis=2), axis=0)
    c = zero
    m_s, z_s, mu_s, m2_s = zero - float("inf"), zero, zero, zero
    m_t, z_t, mu_t, m2_t = zero - float("inf"), zero, zero, zero
    m_1, z_1 = zero - float("inf"), zero
    n, mu_u, m2_u = zero, zero, zero
    MOMENTS: tl.constexpr = 2 if LOSS == 0 else 1  # the KL divergences need no second moment
    # The first block with a valid entry gives every lane its first shift c (stats.py); blocks before it
    # (a leading run of -inf) hold nothing. Usually one pass of this loop: a read of one block that the
    # statistics loop below reads again from cache.
    first = 0
    count = tl.full([], 0.0, tl.float32)
    while (count == 0.0) & (start + first * BLOCK < stop):
        s, t, valid = _load_block(s_row, t_row, start + first * BLOCK, offs, stop, True, NATIVE, WORDS)
        count = tl.sum(tl.sum(tl.sum(valid.to(tl.float32), axis=2), axis=0), axis=0)
        c = zero + _first_shift(s, t, valid, count, LEAD)
        first += 1
    # Whole blocks without a range mask, then the partial last block with one. The cross-entropy
    # takes every finite s, also in the blocks before the first valid entry (a teacher's -inf prefix):
    # with CE those are read again (for the loss they hold nothing).
    full = (stop - start) // BLOCK
    for j in range(0 if CE else tl.maximum(first - 1, 0), full):
        s, t, valid = _load_block(s_row, t_row, start + j * BLOCK, offs, stop, False, NATIVE, WORDS)
        c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1 = _fold_block(
            s, t, valid, c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1,
            s_scale, t_scale, a1_s, a1_t, a1_u, NEED_S, NEED_T, NEED_U, CE, MOMENTS, NATIVE)
    if start + full * BLOCK < stop:
        s, t, valid = _load_block(s_row, t_row, start + full * BLOCK, offs, stop, True, NATIVE, WORDS)
        c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1 = _fold_block(
            s, t, valid, c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1,
            s_scale, t_scale, a1_s, a1_t, a1_u, NEED_S, NEED_T, NEED_U, CE, MOMENTS, NATIVE)

    # The lanes merge once, in a fixed order.
    shift, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1 = _merge_parts(
        c, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1, lane,
        s_scale, t_scale, a1_s, a1_t, a1_u, NEED_S, NEED_T, NEED_U, CE)
    if not NEED_U:  # no count kept: n only tells an empty range (0) from one with entries (1; NaN is one)
        n = tl.where((z_s if NEED_S else z_t) == 0.0, 0.0, 1.0)

    if SPLIT:
        out = part_ptr + (row * tl.num_programs(1) + part) * PARTIAL
        tl.store(out + 0, shift)
        tl.store(out + 1, m_s)
        tl.store(out + 2, z_s)
        tl.store(out + 3, mu_s)
        tl.store(out + 4, m2_s)
        tl.store(out + 5, m_t)
        tl.store(out + 6, z_t)
        tl.store(out + 7, mu_t)
        tl.store(out + 8, m2_t)
        tl.store(out + 9, n)
        tl.store(out + 10, mu_u)
        tl.store(out + 11, m2_u)
        tl.store(out + 12, m_1)
        tl.store(out + 13, z_1)
    else:
        _finalize(
            row, N, V, s_row, labels_ptr, loss_ptr, comp_ptr, stats_ptr,
            shift, n, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u, m_1, z_1,
            s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
            NEED_S, NEED_T, NEED_U, LOSS, CE, COMPONENTS,
        )


@triton.jit
def _raw_sums(x, valid, d, q, scale, ref, z, s1, s2, MOMENTS: tl.constexpr, EXACT: tl.constexpr):
    # One tile into the per-entry raw sums of a softmax around the row's fixed reference: x the logits,
    # p = 2^(x scale - ref), d = s - t - c and q = d^2. Only the row's entries (valid) add: each sum is
    # one predicated FADD or FFMA per entry (sm_90 SASS), with no mask of x, d or q. EXACT forms
    # (x - ref) * scale (ref in raw units): exactly 1 at the reference. Returns p too.
    if EXACT:
        p = tl.exp2((x - ref) * scale)
    else:
        p = tl.exp2(tl.fma(x, scale, -ref))
    z = tl.where(valid, z + p, z)
    if MOMENTS >= 1:
        s1 = tl.where(valid, tl.fma(p, d, s1), s1)
    if MOMENTS >= 2:
        s2 = tl.where(valid, tl.fma(p, q, s2), s2)
    return p, z, s1, s2


@triton.jit
def _raw_moments(z, s1, s2, fix):
    # Per-entry raw sums -> (Z, E[d - c], S2) of the range, taken back to the reference (0 if empty).
    z = tl.sum(tl.sum(tl.sum(z, axis=2), axis=1), axis=0) * fix
    s1 = tl.sum(tl.sum(tl.sum(s1, axis=2), axis=1), axis=0) * fix
    s2 = tl.sum(tl.sum(tl.sum(s2, axis=2), axis=1), axis=0) * fix
    return z, tl.where(z > 0.0, s1 / tl.where(z > 0.0, z, 1.0), 0.0), s2


@triton.jit
def _raw_keep(
    shift, n, m_s, z_s, mu_s, m2_s, b_s, m_t, z_t, mu_t, m2_t, b_t, mu_u, m2_u, b_u, z_1,
    s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, max_cancellation,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, CE: tl.constexpr,
):
    # Whether a row's statistics from raw sums (M2 = S2 - Z mu^2 per base, b = S2 / Z the scale it
    # cancels from) give its loss to fp32 accuracy: (keep, retry, E_w1[d - shift]). The loss's rounding
    # is about 2^-24 times bound = sum_B (a1_B + a2_B) b_B, against 4 * CSD's loss of the same weights
    # (for a KL divergence, w1 = S and w2 = T, Var_S + Var_T + (E_S - E_T)^2: the spread the exact
    # pass's rounding scales with). Around shift + E_w1 the bound equals 4 * loss (stats.py), so a row
    # that fails only the bound is worth one more raw pass there (retry).
    bound = 0.0
    check = 0.0
    if NEED_S:
        bound += (a1_s + a2_s) * b_s
        check += z_s + mu_s + m2_s
    if NEED_T:
        bound += (a1_t + a2_t) * b_t
        check += z_t + mu_t + m2_t
    if NEED_U:
        bound += (a1_u + a2_u) * b_u
        check += mu_u + m2_u
    if CE:
        check += z_1
    loss, e1, _, _, _ = _row_loss(
        shift, 1.0 / tl.maximum(n, 1.0), m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u,
        s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, NEED_S, NEED_T, NEED_U, 0)
    # Kept: a row with a valid entry, finite sums (no overflow from a maximum far above the first
    # block's, no NaN), whose loss carries at most max_cancellation times fp32 rounding (NaN fails too).
    sound = (n > 0.0) & ((check - check) == 0.0)
    keep = sound & (bound <= max_cancellation * (4.0 * loss))
    return keep, sound & (not keep), e1


@triton.jit
def _raw_block(
    s_row, t_row, base, inner, lo, V, c, r_s, r_t, ref_s, ref_1, s_scale, t_scale,
    z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1,
    MASKED: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, CE: tl.constexpr,
    SHARE_CE: tl.constexpr, SUB: tl.constexpr, ENTRIES: tl.constexpr, NATIVE: tl.constexpr, WORDS: tl.constexpr,
    EDGES: tl.constexpr, EDGE_WORDS: tl.constexpr,
):
    # One block, SUB sub-tiles one after the other, into the per-entry sums (one chain each).
    for i in tl.static_range(SUB):
        s, t, valid = _load_block(s_row, t_row, base + i * ENTRIES, inner, V, MASKED, NATIVE, WORDS, lo, EDGES,
                                  EDGE_WORDS)
        d = s - t - c  # unmasked: every sum below adds only the row's entries
        q = d * d  # d^2 once, for every base
        if NEED_S:
            # temperature 1 (SHARE_CE): the cross-entropy's exponentials are S's, over every finite s
            p, z_s, s1_s, s2_s = _raw_sums(s, valid, d, q, s_scale, ref_s if SHARE_CE else r_s, z_s, s1_s, s2_s, 2,
                                           SHARE_CE)
            if SHARE_CE:
                z_1 += p
        if NEED_T:
            _, z_t, s1_t, s2_t = _raw_sums(t, valid, d, q, t_scale, r_t, z_t, s1_t, s2_t, 2, False)
        if NEED_U:
            n = tl.where(valid, n + 1.0, n)
            s1_u = tl.where(valid, s1_u + d, s1_u)
            s2_u = tl.where(valid, s2_u + q, s2_u)
        if CE and not SHARE_CE:  # every finite student entry, temperature 1, exact at the reference
            _, z_1, _, _ = _raw_sums(s, True, d, q, LOG2E, ref_1, z_1, z_1, z_1, 0, True)
    return z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1


@triton.jit
def _fwd_raw_kernel(
    s_ptr, t_ptr, labels_ptr, active_ptr, redo_ptr, part_ptr, loss_ptr, comp_ptr, stats_ptr,
    N, V, L1, cols_per_program,
    s_so, s_si, t_so, t_si,
    s_scale, t_scale,
    a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
    max_cancellation,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, LOSS: tl.constexpr,
    CE: tl.constexpr, COMPONENTS: tl.constexpr, BLOCK: tl.constexpr,
    LEAD: tl.constexpr, SUB: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, NATIVE: tl.constexpr,
    ALIGNED: tl.constexpr, WORDS: tl.constexpr, SHARE_CE: tl.constexpr, SPLIT: tl.constexpr,
    RETRY: tl.constexpr = False, PEEL: tl.constexpr = False, EDGE_WORDS: tl.constexpr = False,
):
    # The fast forward (see "The raw forward" above): raw sums per entry around a fixed reference and
    # shift, taken from the range's first block with a valid entry. Unsplit, a row whose sums cannot
    # give the loss to fp32 accuracy is not written but flagged in redo_ptr: 1 for a second pass of this
    # kernel (RETRY, around the shift left in its stats row), 2 for `_fwd_kernel` (REDO). Split, program
    # (row, p) writes raw partials (stats.P_* with S2 in place of M2) for `_merge_kernel` (RAW).
    # PEEL: rows that do not start 16-byte aligned (V = 50257) are tiled from the aligned address before
    # them, `mis` entries early (the same for s and t, `_peelable`): the blocks inside the range load in
    # 128 bits; the first and the last are masked to the range [lo, hi) of the tiles' columns, entry by
    # entry or, EDGE_WORDS, in whole 32-bit words (`_load_block`).
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if RETRY:  # active_ptr is redo_ptr: only the rows the first pass flagged with 1
        if tl.load(active_ptr + row) != 1:
            return
    elif tl.load(active_ptr + row) == 0:
        if not SPLIT:
            tl.store(redo_ptr + row, 0)
            _store_excluded_row(row, N, loss_ptr, comp_ptr, COMPONENTS)
        return
    s_off = _row_offset(row, L1, s_so, s_si)
    t_off = _row_offset(row, L1, t_so, t_si)
    s_row = s_ptr + s_off
    start = part * cols_per_program
    stop = tl.minimum(start + cols_per_program, V)
    if PEEL:
        mis = s_off % VEC
        s_tile = s_ptr + tl.multiple_of(s_off - mis, VEC)
        t_tile = t_ptr + tl.multiple_of(t_off - mis, VEC)
        lo = start + mis
        stop += mis
    else:
        s_tile = s_row
        t_tile = t_ptr + t_off
        lo = start
    ENTRIES: tl.constexpr = LANES * VEC  # one sub-tile: lane j owns VEC entries (as in _fwd_kernel)
    inner = _tile_offsets(1, LANES, VEC, ALIGNED, WORDS)  # a sub-tile, loaded one after the other
    offs_block = _tile_offsets(SUB, LANES, VEC, ALIGNED, WORDS)  # the whole block: the first one
    # The first block with a valid entry: the shift c (stats.py) and each softmax's reference, its
    # maximum there (the row's maximum can only be higher: no weight underflows that matters).
    first = 0
    count = tl.full([], 0.0, tl.float32)
    c = count
    ref_s = count
    ref_t = count
    while (count == 0.0) & (start + first * BLOCK < stop):
        s, t, valid = _load_block(s_tile, t_tile, start + first * BLOCK, offs_block, stop, True, NATIVE, WORDS,
                                  lo, PEEL, EDGE_WORDS)
        count = tl.sum(tl.sum(tl.sum(valid.to(tl.float32), axis=2), axis=0), axis=0)
        c = _first_shift(s, t, valid, count, LEAD)
        ref_s = tl.max(tl.max(tl.max(tl.where(valid, s, float("-inf")), axis=2), axis=0), axis=0)
        ref_t = tl.max(tl.max(tl.max(tl.where(valid, t, float("-inf")), axis=2), axis=0), axis=0)
        first += 1
    # Exponents as one FMA, x * scale - r with r = fl(ref * scale); `fix` takes the sums back to ref.
    r_s = ref_s * s_scale
    r_t = ref_t * t_scale
    fix_s = tl.exp2(-tl.fma(ref_s, s_scale, -r_s))
    fix_t = tl.exp2(-tl.fma(ref_t, t_scale, -r_t))
    ref_1 = ref_s  # the cross-entropy's reference: the first block's largest valid s

    if SHARE_CE:  # S's exponents in the exact form, around ref_s itself
        fix_s = 1.0
    nil = tl.zeros([], tl.float32)
    # An unused base, or a range without a valid entry, as the exact kernel leaves it.
    empty = count == 0.0
    m_s, m_t, m_1 = nil - float("inf"), nil - float("inf"), nil - float("inf")
    if NEED_S:
        m_s = tl.where(empty, -float("inf"), ref_s)
    if NEED_T:
        m_t = tl.where(empty, -float("inf"), ref_t)
    if CE:
        m_1 = tl.where(empty, -float("inf"), ref_1)
    zero = tl.zeros([1, LANES, VEC], tl.float32)
    z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1 = zero, zero, zero, zero, zero, zero, zero, zero, \
        zero, zero
    if RETRY:  # the second pass of a row the first flagged: around the first's shift + E_w1
        c = tl.load(stats_ptr + row * STATS + 6)
    full = (stop - start) // BLOCK
    begin = 0 if CE else tl.maximum(first - 1, 0)  # CE: every finite s, as in _fwd_kernel
    if PEEL:  # the first block starts before the range: masked (then the loop starts after it)
        if begin == 0:
            z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1 = _raw_block(
                s_tile, t_tile, start, inner, lo, stop, c, r_s, r_t, ref_s, ref_1, s_scale, t_scale,
                z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1,
                True, NEED_S, NEED_T, NEED_U, CE, SHARE_CE, SUB, ENTRIES, NATIVE, WORDS, True, EDGE_WORDS)
            begin = 1
    for j in range(begin, full):  # whole blocks without a range mask
        z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1 = _raw_block(
            s_tile, t_tile, start + j * BLOCK, inner, lo, stop, c, r_s, r_t, ref_s, ref_1, s_scale, t_scale,
            z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1,
            False, NEED_S, NEED_T, NEED_U, CE, SHARE_CE, SUB, ENTRIES, NATIVE, WORDS, False, False)
    if (start + full * BLOCK < stop) & (full >= begin):  # the last block (unless it was the first)
        z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1 = _raw_block(
            s_tile, t_tile, start + full * BLOCK, inner, lo, stop, c, r_s, r_t, ref_s, ref_1, s_scale, t_scale,
            z_s, s1_s, s2_s, z_t, s1_t, s2_t, n, s1_u, s2_u, z_1,
            True, NEED_S, NEED_T, NEED_U, CE, SHARE_CE, SUB, ENTRIES, NATIVE, WORDS, PEEL, EDGE_WORDS)
    # The per-entry sums summed, and taken back to the references.
    z_s, mu_s, s2_s = _raw_moments(z_s, s1_s, s2_s, fix_s)
    z_t, mu_t, s2_t = _raw_moments(z_t, s1_t, s2_t, fix_t)
    n, mu_u, s2_u = _raw_moments(n, s1_u, s2_u, 1.0)
    z_1 = tl.sum(tl.sum(tl.sum(z_1, axis=2), axis=1), axis=0)
    if not NEED_U:  # no count kept: n only tells an empty range (0) from one with entries (1)
        n = tl.where(empty, 0.0, 1.0)
    if SPLIT:
        out = part_ptr + (row * tl.num_programs(1) + part) * PARTIAL
        tl.store(out + 0, c)
        tl.store(out + 1, m_s)
        tl.store(out + 2, z_s)
        tl.store(out + 3, mu_s)
        tl.store(out + 4, s2_s)
        tl.store(out + 5, m_t)
        tl.store(out + 6, z_t)
        tl.store(out + 7, mu_t)
        tl.store(out + 8, s2_t)
        tl.store(out + 9, n)
        tl.store(out + 10, mu_u)
        tl.store(out + 11, s2_u)
        tl.store(out + 12, m_1)
        tl.store(out + 13, z_1)
    else:
        # M2 = S2 - Z mu^2, which cancels to about 2^-24 S2; its bound per base is S2 / Z.
        m2_s = s2_s - z_s * mu_s * mu_s
        m2_t = s2_t - z_t * mu_t * mu_t
        m2_u = s2_u - n * mu_u * mu_u
        keep, retry, e1 = _raw_keep(
            c, n, m_s, z_s, mu_s, m2_s, s2_s / z_s, m_t, z_t, mu_t, m2_t, s2_t / z_t, mu_u, m2_u,
            s2_u / tl.maximum(n, 1.0), z_1, s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, max_cancellation,
            NEED_S, NEED_T, NEED_U, CE)
        if RETRY:
            retry = False
        if retry:  # flag 1: the second raw pass, around the shift it leaves in the stats row
            tl.store(redo_ptr + row, 1)
            tl.store(stats_ptr + row * STATS + 6, c + e1)
        else:  # kept (flag 0, finalised) or for the exact pass (flag 2, nothing else written)
            tl.store(redo_ptr + row, 2 - 2 * keep.to(tl.int8))
            if keep:
                _finalize(
                    row, N, V, s_row, labels_ptr, loss_ptr, comp_ptr, stats_ptr,
                    c, n, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u, m_1, z_1,
                    s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
                    NEED_S, NEED_T, NEED_U, LOSS, CE, COMPONENTS,
                )


@triton.jit
def _column(parts, k, lanes, other):
    return tl.load(parts + k, mask=lanes, other=other)


@triton.jit
def _raw_bound(m_p, z_p, s2_p, scale):
    # A softmax's S2 / Z over P raw partials, each around its own reference (the bound of _raw_keep).
    m = tl.max(m_p, axis=0)
    a = tl.exp2((m_p - tl.where(m == float("-inf"), 0.0, m)) * scale)
    return tl.sum(a * s2_p, axis=0) / tl.sum(a * z_p, axis=0)


@triton.jit
def _merge_kernel(
    part_ptr, s_ptr, labels_ptr, active_ptr, redo_ptr, loss_ptr, comp_ptr, stats_ptr,
    N, V, L1, s_so, s_si, P,
    s_scale, t_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight, max_cancellation,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, LOSS: tl.constexpr,
    CE: tl.constexpr, COMPONENTS: tl.constexpr, BLOCK_P: tl.constexpr, RAW: tl.constexpr = False,
    REDO: tl.constexpr = False,
):
    # RAW: the partials are `_fwd_raw_kernel`'s (S2 in the M2 columns); a row it cannot finalise to
    # fp32 accuracy is flagged in redo_ptr. REDO: only the rows flagged there (active_ptr is redo_ptr).
    row = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + row) == 0:
        if RAW:
            tl.store(redo_ptr + row, 0)
        if not REDO:
            _store_excluded_row(row, N, loss_ptr, comp_ptr, COMPONENTS)
        return
    index = tl.arange(0, BLOCK_P)
    lanes = index < P
    parts = part_ptr + row * P * PARTIAL + index * PARTIAL
    # The columns of stats.P_*; a missing partial reads as an empty one.
    empty = float("-inf")
    c_p, n_p, mu_u, m2_u = _column(parts, 0, lanes, 0.0), _column(parts, 9, lanes, 0.0), \
        _column(parts, 10, lanes, 0.0), _column(parts, 11, lanes, 0.0)
    m_s, z_s, mu_s, m2_s = _column(parts, 1, lanes, empty), _column(parts, 2, lanes, 0.0), \
        _column(parts, 3, lanes, 0.0), _column(parts, 4, lanes, 0.0)
    m_t, z_t, mu_t, m2_t = _column(parts, 5, lanes, empty), _column(parts, 6, lanes, 0.0), \
        _column(parts, 7, lanes, 0.0), _column(parts, 8, lanes, 0.0)
    m_1, z_1 = _column(parts, 12, lanes, empty), _column(parts, 13, lanes, 0.0)
    if RAW:  # S2 around each part's shift -> M2 around its mean; the bounds before the merge
        b_s = _raw_bound(m_s, z_s, m2_s, s_scale)
        b_t = _raw_bound(m_t, z_t, m2_t, t_scale)
        b_u = tl.sum(m2_u, axis=0) / tl.maximum(tl.sum(n_p, axis=0), 1.0)
        m2_s = m2_s - z_s * mu_s * mu_s
        m2_t = m2_t - z_t * mu_t * mu_t
        m2_u = m2_u - n_p * mu_u * mu_u
    shift, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n, mu_u, m2_u, m_1, z_1 = _merge_parts(
        c_p, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, n_p, mu_u, m2_u, m_1, z_1, index,
        s_scale, t_scale, a1_s, a1_t, a1_u, NEED_S, NEED_T, NEED_U, CE)
    keep = True
    if RAW:  # a row kept (flag 0) is finalised; one flagged 2 goes to the exact partials and merge
        keep, _, _ = _raw_keep(
            shift, n, m_s, z_s, mu_s, m2_s, b_s, m_t, z_t, mu_t, m2_t, b_t, mu_u, m2_u, b_u, z_1,
            s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, max_cancellation, NEED_S, NEED_T, NEED_U, CE)
        tl.store(redo_ptr + row, 2 - 2 * keep.to(tl.int8))
    if keep:
        _finalize(
            row, N, V, _row_base(s_ptr, row, L1, s_so, s_si), labels_ptr, loss_ptr, comp_ptr, stats_ptr,
            shift, n, m_s, z_s, mu_s, m2_s, m_t, z_t, mu_t, m2_t, mu_u, m2_u, m_1, z_1,
            s_scale, a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
            NEED_S, NEED_T, NEED_U, LOSS, CE, COMPONENTS,
        )


@triton.jit
def _bwd_kernel(
    # pointers (g_ptr may alias s_ptr: each program reads its block before writing it)
    s_ptr, t_ptr, g_ptr, labels_ptr, active_ptr, stats_ptr, grow_ptr,
    # shapes; first_edge: PEEL's first block after the interior ones
    V, L1, first_edge,
    # strides (the vocabulary stride is 1)
    s_so, s_si, t_so, t_si, g_so, g_si, grow_stride,
    # log2(e) / temperature and log2(e) / teacher_temperature
    s_scale, t_scale,
    a1_s, a1_t, a1_u, a2_s, a2_t, a2_u, csd_weight, ce_weight,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_U: tl.constexpr, LOSS: tl.constexpr,
    CE: tl.constexpr, SHARDED: tl.constexpr, BLOCK: tl.constexpr, NATIVE: tl.constexpr,
    PEEL: tl.constexpr = False, MASKED: tl.constexpr = True, VEC: tl.constexpr = 1,
):
    # PEEL: rows that do not start 16-byte aligned (the same for s, t and g, `_peelable`), in two grids
    # (`_peel_block`).
    row = tl.program_id(0).to(tl.int64)
    s_off = _row_offset(row, L1, s_so, s_si)
    offs, mis, in_range = _peel_block(s_off, first_edge, V, BLOCK, VEC, PEEL, MASKED)
    s_row = _peel_base(s_ptr, s_off, mis, VEC, PEEL)
    t_row = _peel_base(t_ptr, _row_offset(row, L1, t_so, t_si), mis, VEC, PEEL)
    g_row = _peel_base(g_ptr, _row_offset(row, L1, g_so, g_si), mis, VEC, PEEL)
    if tl.load(active_ptr + row) == 0:
        zero = tl.zeros([BLOCK], tl.float32).to(g_ptr.dtype.element_ty)
        if MASKED:
            tl.store(g_row + offs, zero, mask=in_range)
        else:
            tl.store(g_row + offs, zero)
        return

    stats_row = stats_ptr + row * STATS
    m_s = tl.load(stats_row + 0)
    log2z_s = tl.load(stats_row + 1)
    m_t = tl.load(stats_row + 2)
    log2z_t = tl.load(stats_row + 3)
    e1 = tl.load(stats_row + 4)
    e2 = tl.load(stats_row + 5)
    shift = tl.load(stats_row + 6)
    inv_n = tl.load(stats_row + 7)
    upstream = tl.load(grow_ptr + row * grow_stride).to(tl.float32)

    s, t, valid = _load_block(s_row, t_row, 0, offs, V + mis, MASKED, NATIVE, False, mis, PEEL)
    dd = s - t - shift
    # (x - m) first, then the scale: exact exponents near the max at any |x| (stats.py)
    p_s = tl.exp2((s - m_s) * s_scale - log2z_s)
    p_t = tl.exp2((t - m_t) * t_scale - log2z_t)
    if LOSS == 0:  # CSD: 1/2 (w2 (d - E_w1) + w1 (d - E_w2)) = 1/2 ((w1 + w2) (d - c) - (w2 e1 + w1 e2))
        # with e1 = E_w1[d - c] and e2 = E_w2[d - c]: both weights are mixtures of the same bases, so
        # w1 + w2 and w2 e1 + w1 e2 are mixtures too, with per-row coefficients (one FMA per base each).
        # No cancellation is added: c sits on E_w1, so e1 is a rounding residual and the two products are
        # of the size of the terms they replace.
        w = _mix(a1_s + a2_s, a1_t + a2_t, a1_u + a2_u, p_s, p_t, inv_n, NEED_S, NEED_T, NEED_U)
        w_e = _mix(e1 * a2_s + e2 * a1_s, e1 * a2_t + e2 * a1_t, e1 * a2_u + e2 * a1_u, p_s, p_t, inv_n,
                   NEED_S, NEED_T, NEED_U)
        g = w * dd - w_e
        scale = 0.5 * csd_weight
    elif LOSS == 1:  # KL(T || S): (p_S - p_T) / tau
        g = p_s - p_t
        scale = csd_weight * s_scale * LN2
    else:  # KL(S || T): p_S (d - E_S[d]) / tau^2
        g = p_s * (dd - e1)
        scale = csd_weight * (s_scale * LN2) * (s_scale * LN2)
    # The row's constants (the upstream gradient among them) multiply once per entry. A non-finite
    # upstream still reaches every entry (NaN * 0), as `upstream * g` would.
    g = tl.where(valid, g, 0.0) * (upstream * scale)
    if CE:  # softmax(s) - onehot(label), with p - 1 formed in fp32 before the final cast
        label = tl.load(labels_ptr + row).to(tl.int64)
        label_ok = (label >= 0) & (label < V)
        p_1 = tl.exp2((s - tl.load(stats_row + 8)) * LOG2E - tl.load(stats_row + 9))
        # the one-hot compared in int32 (offs are int32; a label outside [0, V) matches no column)
        ce_grad = tl.where(offs - mis == tl.where(label_ok, label, -1).to(tl.int32), p_1 - 1.0, p_1)
        ce_scale = upstream * ce_weight
        if not SHARDED:  # a vocabulary shard's label may lie in another shard: no one-hot here, no NaN
            ce_scale = tl.where(label_ok, ce_scale, float("nan"))  # NaN over the row, through the row's constant
        g += ce_scale * ce_grad
    if MASKED:
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=in_range)
    else:
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
# Block-size heuristic (one place). Not yet measured on a GPU. The backward: one block of up to 4096
# entries per program, 8 warps (16 entries per thread), 4 warps for short rows. The forward (see
# forward_config): 2 warps a row, each thread streaming 16 entries (two 128-bit loads of s and of t) per
# block, so that the per-row work (first shift, masked last block, merge of the lanes: about a thousand
# instructions per thread) costs little per entry; a split row's program streams at least
# MIN_SPLIT_BLOCKS blocks for the same reason. The GPU-validation issue sweeps these and replaces this
# comment with the measured table.
MAX_BLOCK = 4096
FORWARD_WARPS = 2
FORWARD_SUB = 2
# ptxas otherwise spills a register or two of the two-softmax forwards at about 80 registers.
FORWARD_MAX_REGISTERS = 168
# The raw forward (`_fwd_raw_kernel`) for unsplit rows; a row whose loss it could only give with more
# than MAX_CANCELLATION times fp32 rounding is redone by the exact `_fwd_kernel`.
RAW_FORWARD = True
MAX_CANCELLATION = 16.0
# One warp a row for the raw pass: its threads' sums merge with shuffles alone (no shared memory), and
# at its 80-145 registers the SM holds as many warps either way (sm_90 model: 3-6 % fewer instructions
# per entry than with two warps).
RAW_WARPS = 1
# Grid target when splitting rows: enough programs to give every SM several resident programs.
PROGRAMS_PER_SM = 8
MIN_SPLIT_BLOCKS = 16


def block_config(vocab: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) for a row of `vocab` entries, used by both the forward and the backward."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 16)))
    return block, 8 if block >= 2048 else 4


def forward_config(vocab: int, itemsize: int, warps: int = FORWARD_WARPS) -> Tuple[int, int, int, int, int]:
    """(BLOCK, num_warps, SUB, LANES, VEC) of the forward for rows of `vocab` entries of `itemsize` bytes.

    The forward's (SUB, LANES, VEC) tile: VEC entries of 16 bytes (one 128-bit load) per lane and row of
    the tile, one lane per thread, FORWARD_SUB rows. Its per-row work (the search for the first shift,
    the masked last block, the merge of the lanes) is paid once per row by each thread, so a row gets
    few threads (FORWARD_WARPS); a GPU holds enough such rows at once to keep its loads in flight."""
    vec = max(1, 16 // itemsize)
    block = min(MAX_BLOCK, FORWARD_SUB * 32 * warps * vec, triton.next_power_of_2(max(vocab, 16)))
    lanes = min(32 * warps, max(1, block // vec))
    vec = min(vec, block)
    return block, warps, max(1, block // (lanes * vec)), lanes, vec


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on CPU: small, so the tests' few rows exercise the split path


def split_count(n_rows: int, vocab: int, block: int, device: torch.device) -> int:
    """Programs per row: 1 when there are rows enough to fill the GPU, more for few long rows."""
    blocks = triton.cdiv(vocab, block)
    target = PROGRAMS_PER_SM * _num_sms(device)
    if n_rows >= target:
        return 1
    wanted = min(triton.cdiv(blocks, MIN_SPLIT_BLOCKS), triton.cdiv(target, max(n_rows, 1)))
    # Give every program the same whole number of blocks, and no program an empty range.
    return triton.cdiv(blocks, triton.cdiv(blocks, wanted))


def _row_layout(lead: torch.Size, tensors):
    """Address rows of tensors with leading shape `lead` as (N // L1, L1): (L1, [(outer, inner) strides]).

    Returns None when some tensor's leading dims do not collapse into two strided dims. Slices such as
    logits[:, :-1] of a (B, L, V) tensor collapse into exactly two, so they need no copy.
    """
    keep = [i for i, size in enumerate(lead) if size != 1]  # size-1 dims have no meaningful stride
    sizes = [lead[i] for i in keep]
    breaks = set()
    for x in tensors:
        strides = [x.stride(i) for i in keep]
        for j in range(1, len(keep)):
            if strides[j - 1] != strides[j] * sizes[j]:
                breaks.add(j)
    if len(breaks) > 1:
        return None
    if not keep:
        return 1, [(0, 0) for _ in tensors]
    split = breaks.pop() if breaks else 0
    l1 = math.prod(sizes[split:])
    return l1, [(x.stride(keep[split - 1]) if split else 0, x.stride(keep[-1])) for x in tensors]


def _rows(*tensors: torch.Tensor):
    """(tensors, L1, strides) for the kernels: unit vocabulary stride, leading dims as two strided dims.

    Copies (x.contiguous()) only a tensor with a strided vocabulary dimension or leading dims that need
    more than two strides; both are rare in practice.
    """
    tensors = [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]
    lead = tensors[0].shape[:-1]
    layout = _row_layout(lead, tensors)
    if layout is None:
        tensors = [x.contiguous() for x in tensors]
        layout = _row_layout(lead, tensors)
    l1, strides = layout
    return tensors, l1, strides


def _per_row(x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A per-row tensor (labels, active flags) as the kernels index it: `ptr + row`, so contiguous.

    A strided or stride-0 view (batch[:, 2], torch.tensor([False]).expand(n)) is copied: O(N) bytes."""
    return x.reshape(n_rows).contiguous()


def _address(x: torch.Tensor) -> int:
    return x.storage_offset() * x.element_size() if x.is_meta else x.data_ptr()


def _aligned(tensors, strides) -> bool:
    """Whether every row starts 16-byte aligned as Triton's launch specialisation can prove it (16-byte
    aligned pointers, strides divisible by 16), i.e. whether the logits move in 128-bit loads."""
    return all(_address(x) % 16 == 0 for x in tensors) and all(k % 16 == 0 for k in strides)


def _peelable(tensors, strides, vec: int) -> bool:
    """Whether rows that are not 16-byte aligned can be tiled from the aligned address before them
    (PEEL, the raw forward's and the backward's): one itemsize, 16-byte aligned pointers, and every row
    of each tensor as far past an aligned address as the same row of the first (`strides`: a tensor's
    (outer, inner), equal modulo the `vec` entries of 16 bytes)."""
    (so, si) = strides[0]
    return len({x.element_size() for x in tensors}) == 1 and all(_address(x) % 16 == 0 for x in tensors) \
        and all((o - so) % vec == 0 and (i - si) % vec == 0 for o, i in strides)


def _holds_last_word(x: torch.Tensor) -> bool:
    """Whether x's storage holds the whole 32-bit word of x's last entry, so that a peeled bf16 row's
    word across its end stays inside it (EDGE_WORDS; a fresh (N, V) tensor with N V odd ends half a
    word short)."""
    # entries counted from the storage's start, as 16-byte aligned as x's (PEEL): words start at even ones
    end = x.storage_offset() + sum((n - 1) * k for n, k in zip(x.shape, x.stride())) + 1
    return (end + end % 2) * x.element_size() <= x.untyped_storage().nbytes()


def peels(tensors, strides) -> bool:
    """Whether rows of `tensors` (`strides`: each one's (outer, inner)) take PEEL: they do not start
    16-byte aligned as Triton's specialisation can prove (`_aligned`), and can be tiled from the
    aligned address before them (`_peelable`)."""
    return not _aligned(tensors, sum(strides, ())) and _peelable(tensors, strides, 16 // tensors[0].element_size())


def peel_grids(tensors, strides, vocab: int, block: int):
    """(first_edge, [(programs per row, layout constexprs)]) of a backward over rows of `tensors`
    (`strides`: each one's (outer, inner)) in blocks of `block` entries (`_peel_block`): one masked
    grid where the rows start 16-byte aligned or cannot be peeled, else PEEL's interior grid (if any)
    and its edges'."""
    vec = 16 // tensors[0].element_size()
    first_edge = max(vocab // block, 1)
    if not peels(tensors, strides):
        return first_edge, [(triton.cdiv(vocab, block), dict(PEEL=False, MASKED=True, VEC=vec))]
    grids = [(first_edge - 1, dict(PEEL=True, MASKED=False, VEC=vec)),
             (1 + triton.cdiv(vocab + vec - 1, block) - first_edge, dict(PEEL=True, MASKED=True, VEC=vec))]
    return first_edge, [grid for grid in grids if grid[0]]


def _launch_constants(spec: LossSpec):
    return (
        LOG2E.value / spec.temperature,
        LOG2E.value / spec.teacher_temperature,
        *spec.w1,
        *spec.w2,
        spec.csd_weight,
        spec.ce_weight,
    )


def _flags(spec: LossSpec):
    return dict(NEED_S=spec.need_student, NEED_T=spec.need_teacher, NEED_U=spec.need_uniform,
                LOSS=spec.kind_code, CE=spec.has_ce)


def _launch_forward(student, teacher, active, labels, spec, components, programs, partials, raw=False,
                    outputs=None):
    """The forward over all rows; `partials` (N, programs, PARTIAL) when split, else None.

    Unsplit: the raw pass (RAW_FORWARD), then the exact one over the rows it flags; returns (total,
    components or None, stats). Split: one pass writing partials, raw (`raw`) or exact; `active` may be
    the raw merge's redo flags. `outputs` (total, components, stats): written in place."""
    vocab = student.shape[-1]
    n_rows = active.numel()
    device = student.device
    if outputs is None:
        outputs = _forward_outputs(n_rows, components, device)
    total, parts, stats = outputs
    if n_rows == 0:
        return outputs
    (s, t), l1, ((s_so, s_si), (t_so, t_si)) = _rows(student, teacher)
    active = _per_row(active, n_rows)
    # The labels are read only where a row is finalised; a placeholder pointer otherwise.
    labels = _per_row(labels, n_rows) if spec.has_ce and partials is None else active
    comp = parts if components else total  # likewise
    aligned = _aligned((s, t), (s_so, s_si, t_so, t_si))
    # bf16 rows of whole 32-bit words (an even V) load as words (see _load_block)
    words = aligned and vocab % 2 == 0 and s.dtype == torch.bfloat16 and t.dtype == torch.bfloat16
    common = dict(maxnreg=FORWARD_MAX_REGISTERS, COMPONENTS=components, LEAD=spec.lead_base,
                  NATIVE=student.device.type != "cpu", ALIGNED=aligned, WORDS=words, **_flags(spec))
    if raw or (partials is None and RAW_FORWARD):
        block, num_warps, sub, lanes, vec = forward_config(vocab, student.element_size(), RAW_WARPS)
        raw_layout = dict(ALIGNED=aligned, WORDS=words, PEEL=False, EDGE_WORDS=False)
        if peels((s, t), ((s_so, s_si), (t_so, t_si))):
            bf16 = s.dtype == t.dtype == torch.bfloat16
            raw_layout = dict(ALIGNED=True, WORDS=bf16, PEEL=True,
                              EDGE_WORDS=bf16 and _holds_last_word(s) and _holds_last_word(t))
        cols_per_program = triton.cdiv(triton.cdiv(vocab, block), programs) * block
        redo = torch.empty(n_rows if partials is None else 0, dtype=torch.int8, device=device)
        # Unsplit: the raw pass, its second pass over the rows it flags 1, the exact pass over those
        # flagged 2 (each launch returns at once for the other rows).
        for retry in (False, True) if partials is None else (False,):
            _fwd_raw_kernel[(n_rows, programs)](
                s, t, labels, redo if retry else active, redo, partials if partials is not None else total,
                total, comp, stats,
                n_rows, vocab, l1, cols_per_program,
                s_so, s_si, t_so, t_si,
                *_launch_constants(spec), MAX_CANCELLATION,
                SHARE_CE=spec.has_ce and spec.need_student and spec.temperature == 1.0,
                SPLIT=partials is not None, RETRY=retry,
                BLOCK=block, num_warps=num_warps, SUB=sub, LANES=lanes, VEC=vec, **{**common, **raw_layout},
            )
        if partials is not None:
            return outputs
        active = redo  # the exact pass below: only the rows flagged 2 (no row is left at 1)
    block, num_warps, sub, lanes, vec = forward_config(vocab, student.element_size())
    cols_per_program = triton.cdiv(triton.cdiv(vocab, block), programs) * block
    _fwd_kernel[(n_rows, programs)](
        s, t, labels, active, partials if partials is not None else total, total, comp, stats,
        n_rows, vocab, l1, cols_per_program,
        s_so, s_si, t_so, t_si,
        *_launch_constants(spec),
        SPLIT=partials is not None, REDO=partials is None and RAW_FORWARD,
        BLOCK=block, num_warps=num_warps, SUB=sub, LANES=lanes, VEC=vec, **common,
    )
    return outputs


def _forward_outputs(n_rows, components, device):
    """(total (N,), components (2, N) or None, stats (N, NUM_STATS)) of a forward, fp32.

    stats is zeroed (N x 64 bytes, negligible): excluded rows and the padding columns are never written,
    and an operator's outputs must not carry uninitialised memory."""
    return (torch.empty(n_rows, dtype=torch.float32, device=device),
            torch.empty(2, n_rows, dtype=torch.float32, device=device) if components else None,
            torch.zeros(n_rows, st.NUM_STATS, dtype=torch.float32, device=device))


def partials(student, teacher, active, labels, spec, programs: int = 1) -> torch.Tensor:
    """(N, programs, PARTIAL) row statistics of `programs` column ranges each (layout in stats.py)."""
    out = torch.zeros(active.numel(), programs, st.PARTIAL, dtype=torch.float32, device=student.device)
    _launch_forward(student, teacher, active, labels, spec, False, programs, out)
    return out


def finalize(parts, student, active, labels, spec, components: bool = False, raw=None, outputs=None):
    """Merge (N, P, PARTIAL) partial statistics of each row (in a fixed order) and finalise the rows:
    (total (N,), components (2, N) or None, stats (N, NUM_STATS)). CE reads s[label] from `student`.

    `raw`: an (N,) int8 tensor; the partials are the raw pass's, and the rows it cannot finalise to fp32
    accuracy are flagged there (and not written). `outputs`: written in place, and then only the rows
    `active` marks (the flagged rows' exact partials)."""
    n_rows = active.numel()
    device = parts.device
    redo = outputs is not None
    if outputs is None:
        outputs = _forward_outputs(n_rows, components, device)
    total, pieces, stats = outputs
    if n_rows == 0:
        return outputs
    parts = parts.reshape(n_rows, -1, st.PARTIAL).contiguous()
    (s,), l1, ((s_so, s_si),) = _rows(student)
    active = _per_row(active, n_rows)
    constants = _launch_constants(spec)
    _merge_kernel[(n_rows,)](
        parts, s, _per_row(labels, n_rows) if spec.has_ce else active, active,
        raw if raw is not None else active, total, pieces if components else total, stats,
        n_rows, student.shape[-1], l1, s_so, s_si, parts.shape[1],
        *constants, MAX_CANCELLATION,
        BLOCK_P=triton.next_power_of_2(parts.shape[1]), num_warps=1, COMPONENTS=components,
        RAW=raw is not None, REDO=redo, **_flags(spec),
    )
    return outputs


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor,
    labels: Optional[torch.Tensor],
    spec: LossSpec,
    components: bool = False,
    splits: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(total (N,), components (2, N) = [loss, CE] or None, row statistics (N, NUM_STATS)), all fp32.

    `total` is csd_weight * loss + ce_weight * CE, 0 at excluded positions. `splits` overrides the
    programs-per-row heuristic (tests use it)."""
    vocab, n_rows = student.shape[-1], active.numel()
    block = forward_config(vocab, student.element_size())[0]
    programs = split_count(n_rows, vocab, block, student.device) if splits is None else splits
    if programs == 1:  # one program per row finalises its own row (the raw pass, then the exact redo)
        return _launch_forward(student, teacher, active, labels, spec, components, 1, None)
    if not RAW_FORWARD:
        split = partials(student, teacher, active, labels, spec, programs)
        return finalize(split, student, active, labels, spec, components)
    # Split rows: raw partials and their merge, then the exact partials and merge of the flagged rows.
    split = torch.zeros(n_rows, programs, st.PARTIAL, dtype=torch.float32, device=student.device)
    _launch_forward(student, teacher, active, labels, spec, False, programs, split, raw=True)
    redo = torch.empty(n_rows, dtype=torch.int8, device=student.device)
    outputs = finalize(split, student, active, labels, spec, components, raw=redo)
    _launch_forward(student, teacher, redo, labels, spec, False, programs, split)
    return finalize(split, student, redo, labels, spec, components, outputs=outputs)


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

    `sharded_labels`: the logits are one vocabulary shard and `labels` are shard-local, so a label
    outside [0, V) belongs to another shard (no one-hot here) rather than being an error (NaN)."""
    vocab = student.shape[-1]
    n_rows = active.numel()
    if out is None:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return out
    (s, t, g), l1, ((s_so, s_si), (t_so, t_si), (g_so, g_si)) = _rows(student, teacher, out)
    active = _per_row(active, n_rows)
    labels = _per_row(labels, n_rows) if spec.has_ce else active
    grad_rows = grad_rows.reshape(n_rows)  # its stride is passed: a stride-0 broadcast needs no copy
    block, num_warps = block_config(vocab)
    first_edge, grids = peel_grids((s, t, g), ((s_so, s_si), (t_so, t_si), (g_so, g_si)), vocab, block)
    for programs, layout in grids:
        _bwd_kernel[(n_rows, programs)](
            s, t, g, labels, active, stats, grad_rows,
            vocab, l1, first_edge,
            s_so, s_si, t_so, t_si, g_so, g_si, grad_rows.stride(0),
            *_launch_constants(spec),
            BLOCK=block, num_warps=num_warps, SHARDED=sharded_labels, NATIVE=s.device.type != "cpu",
            **layout, **_flags(spec),
        )
    if g is not out:  # `out` could not be addressed as rows (only an exotic in-place target)
        out.copy_(g)
    return out
