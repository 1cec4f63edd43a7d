"""Row statistics shared by every CSD backend: the maths of the streaming pass.

For one row with student logits s, teacher logits t and d = s - t (fp32), CSD with weights (w1, w2) is

    loss = 1/4 * sum_x sum_y w1(x) w2(y) (d_x - d_y)^2
         = 1/4 * ( Var_w1(d) + Var_w2(d) + (E_w1[d] - E_w2[d])^2 )
    dloss/ds_k = 1/2 * ( w2(k) (d_k - E_w1[d]) + w1(k) (d_k - E_w2[d]) )

Each w is a convex mixture a_S S + a_T T + a_U U of the base distributions, and mixtures are linear, so
E_w[d] = sum_B a_B E_B[d] and E_w[d^2] = sum_B a_B E_B[d^2]. One pass over the vocabulary therefore only
needs, per base distribution B that carries weight, the normaliser and the first two moments of d:

    S, T:  running max m of the raw logits (s or t), Z = sum exp((x - m) / tau), and the weighted mean
           mu = E[d - c] and centred second moment M2 = sum exp((x - m) / tau) (d - c - mu)^2, rescaled by
           exp((m_old - m_new) / tau) whenever the running max grows (the online-softmax recurrence);
    U:     n = number of valid entries, mu = mean of (d - c), M2 = sum (d - c - mu)^2.

Blocks of entries are folded in with the pairwise update of Chan et al.: with the block's sums taken
around the running mean, b1 = sum p (d - c - mu), b2 = sum p (d - c - mu)^2 and Z' = Z + sum p,

    mu' = mu + b1 / Z',    M2' = M2 + b2 - b1^2 / Z',

so the variance is never formed as E[x^2] - E[x]^2 and does not cancel, whether d carries a large
constant offset (logits of 1e4 with differences of 1e-1) or drifts along the row. (One exception, in the
Triton forward: U's tile of 16 entries takes its M2 from raw sums around the lane's shift c, which sits on
the running mean. With unit weights a tile far from c moves Var_U by as much as that costs in rounding;
a softmax's mass can jump to a far outlier, so S and T keep the centred sweep.) The maxima are kept in
raw logit units and exponents are formed as (x - m) / tau, never as x / tau - m / tau: at |x| ~ 1e4 the
latter loses ~1e-3 of relative accuracy in every weight.

c is a per-row shift that keeps mu small, so the backward's d - c - E[d - c] does not cancel either. It is
taken from the first block (or chunk) in which the row has any valid entry, so leading runs of -inf
entries cannot leave it at a meaningless 0: d at the mode of w1's lead base (the largest s for S, the
largest t for T; the mean of the valid d for U), and after every block it moves onto the running E_w1,
split exactly with TwoSum (c + E = c' + r, r the new, tiny E), so the means stay small and precise even
when d drifts along the row or the mass jumps to a far outlier. Partial statistics of programs or
shards p that cover different vocabulary ranges, each with its own shift c_p, merge exactly (Chan's
parallel form): with c the count-weighted mean of the c_p, x_p = mu_p + c_p - c, a_p = exp((m_p - m) / tau)
and w_p = a_p Z_p,

    Z = sum w_p,   mu = sum w_p x_p / Z,   M2 = sum (a_p M2_p + w_p (x_p - mu)^2).

For the backward, the finalised shift is moved onto E_w1 (split exactly with TwoSum into a new c and a
tiny remainder E_w1[d - c]), so d - c - E_w1[d - c] stays exact where w2 has its mass even when d drifts
far from the first block's mean.

A mixture's moments follow from its bases' without cancellation either:
E_w = sum_B a_B mu_B and Var_w = sum_B a_B (M2_B / Z_B + (mu_B - E_w)^2).

The KL divergences are functions of the same statistics. With one temperature tau on both sides,
log p_S(k) - log p_T(k) = d_k / tau - lse_S + lse_T, so

    KL(T || S) = lse_S - lse_T - E_T[d] / tau,     dKL/ds_k = (S(k) - T(k)) / tau
    KL(S || T) = E_S[d] / tau - lse_S + lse_T,     dKL/ds_k = S(k) (d_k - E_S[d]) / tau^2

(the reverse-KL gradient is CSD's "ss" gradient scaled by 2 / tau^2). A KL call is therefore posed as
w1 = S, w2 = T, and the backends skip the second moments.

The hard-label cross-entropy fused into the same pass (`ce_weight`) is the usual one, over every finite
student entry at temperature 1: CE = lse_1(s) - s[label], dCE/ds_k = softmax(s)_k - [k = label]. It
needs one more running log-sum-exp and one load of s[label] per row.

An entry where s or t is -inf lies outside the row's vocabulary: weight 0, gradient 0, not counted in n.
A row with no valid entry has loss 0.

What the forward keeps for the backward, per row (fp32, in this column order). A weight is recomputed as
exp2((x - m) * log2(e) / tau - log2 Z): the maximum in raw units and log2 Z (a small number) are kept
apart, since one log-sum-exp of ~1e4 in fp32 already carries an error of ~1e-3 in the exponent.
"""

M_S = 0  # max of s over valid entries (raw logit units)
LOG2Z_S = 1  # log2 of Z for S = softmax(s / temperature) around M_S
M_T = 2  # max of t over valid entries
LOG2Z_T = 3  # log2 of Z for T = softmax(t / teacher_temperature) around M_T
E_W1 = 4  # E_w1[d - c]
E_W2 = 5  # E_w2[d - c]
SHIFT = 6  # c
INV_N = 7  # 1 / n (0 for an empty row)
M_1 = 8  # max of s over the student's finite entries (cross-entropy only)
LOG2Z_1 = 9  # log2 of the cross-entropy softmax's Z around M_1
NUM_STATS = 16  # 10 used; rows of 64 bytes

# Partial row statistics of a range of columns, before the row is finalised (the Triton kernels' split
# rows, vocabulary-parallel shards). Maxima in raw logit units; moments as described above.
P_SHIFT = 0  # c
P_S = 1  # (m, Z, mu, M2) of S
P_T = 5  # (m, Z, mu, M2) of T
P_N = 9  # n
P_U = 10  # (mu, M2) of U
P_CE = 12  # (m, Z) of the cross-entropy's softmax
P_LABEL = 14  # (s[label], 1) on the shard that owns the label, else (0, 0): vocabulary-parallel CE only
PARTIAL = 16
