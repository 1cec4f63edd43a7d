"""Row statistics shared by every CSD backend: the maths of the streaming pass.

For one row with student logits s, teacher logits t and d = s - t (fp32), CSD with weights (w1, w2) is

    loss = 1/4 * sum_x sum_y w1(x) w2(y) (d_x - d_y)^2
         = 1/4 * ( Var_w1(d) + Var_w2(d) + (E_w1[d] - E_w2[d])^2 )
    dloss/ds_k = 1/2 * ( w2(k) (d_k - E_w1[d]) + w1(k) (d_k - E_w2[d]) )

Each w is a convex mixture a_S S + a_T T + a_U U of the base distributions, and mixtures are linear, so
E_w[d] = sum_B a_B E_B[d] and E_w[d^2] = sum_B a_B E_B[d^2]. One pass over the vocabulary therefore only
needs, per base distribution B that carries weight, the normaliser and the first two moments of d:

    S, T:  running max m, Z = sum exp(x - m), M1 = sum exp(x - m) (d - c), M2 = sum exp(x - m) (d - c)^2
           with x = s / temperature or t / teacher_temperature, rescaled by exp(m_old - m_new) whenever
           the running max grows (the online-softmax recurrence);
    U:     n = number of valid entries, M1 = sum (d - c), M2 = sum (d - c)^2.

c is a per-row shift (the mean of d over the first block a program reads). Moments around c rather than
0 keep Var = E[(d-c)^2] - E[d-c]^2 from cancelling catastrophically when d carries a large constant
offset (logits of 1e3 with differences of 1e-2 are common after long training). Partial statistics
from programs that cover different vocabulary ranges, with shifts c_p, merge exactly into shift c:

    M1 += Z_p (c_p - c),   M2 += 2 (c_p - c) M1_p + Z_p (c_p - c)^2,   all scaled by exp(m_p - m).

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

What the forward keeps for the backward, per row (fp32, in this column order):
"""

LSE_S = 0  # log-sum-exp of s / temperature over valid entries (natural log)
LSE_T = 1  # log-sum-exp of t / teacher_temperature over valid entries (natural log)
E_W1 = 2  # E_w1[d - c]
E_W2 = 3  # E_w2[d - c]
SHIFT = 4  # c
INV_N = 5  # 1 / n (0 for an empty row)
LSE_1 = 6  # log-sum-exp of s at temperature 1 over the student's finite entries (cross-entropy only)
NUM_STATS = 8  # 7 used; rows of 32 bytes

# Partial row statistics of a range of columns, before the row is finalised (the Triton kernels' split
# rows, vocabulary-parallel shards): maxima in log2 units (base-2 exponentials, as the kernels use).
P_SHIFT = 0  # c
P_S = 1  # (m, Z, M1, M2) of S
P_T = 5  # (m, Z, M1, M2) of T
P_N = 9  # n
P_U = 10  # (M1, M2) of U
P_CE = 12  # (m, Z) of the cross-entropy's softmax
PARTIAL = 16  # 14 used
