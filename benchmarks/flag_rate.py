"""How many rows the Triton forward's raw pass flags for a second read: a model, not a measurement.

`_fwd_raw_kernel` keeps a row when bound = sum_B (a1_B + a2_B) S2_B / Z_B is at most MAX_CANCELLATION
times 4 * loss, with S2_B the raw second moment of d around the shift c taken from the row's first
block (d at the mode of w1's lead base; the mean of d there for U). Here that test is evaluated in
float64 torch on synthetic rows: a teacher t ~ N(0, 2^2) with a peak added at a random id (a confident
teacher), a student s = t + noise. A flagged row costs the forward a second read of s and t.

    python -m benchmarks.flag_rate --out benchmarks/results

writes flag_rate.csv (one row per peak height, noise and weighting). The GPU-validation issue should
measure the same on a real teacher's logits: where a teacher's top-1 probability is high, many rows
are read twice.
"""

from __future__ import annotations

import argparse
import csv
import os

PEAKS = (0.0, 8.0, 12.0, 14.0, 16.0, 20.0)
NOISES = (0.3, 1.0)
WEIGHTINGS = ("ss", "ts", "st", "tt", "us")
FIELDS = ["peak", "noise", "mean_top1", "weighting", "flagged", "rows", "vocab", "first_block",
          "max_cancellation"]


def flagged(student, teacher, spec, first_block, max_cancellation):
    """(N,) bool: the raw pass's test fails (rows of finite float64 logits, temperature 1)."""
    import torch

    d = student - teacher
    head = slice(0, first_block)
    if spec.lead_base == 2:  # U: the mean of d over the first block
        c = d[:, head].mean(1, keepdim=True)
    else:  # d at the mode of the lead base there (the largest d on a tie)
        x = (student if spec.lead_base == 0 else teacher)[:, head]
        at_mode = x == x.max(1, keepdim=True).values
        c = torch.where(at_mode, d[:, head], -torch.inf).max(1, keepdim=True).values
    e = d - c
    means, variances, raw = [], [], []
    for weights in (torch.softmax(student, 1), torch.softmax(teacher, 1), torch.full_like(d, 1.0 / d.shape[1])):
        mu = (weights * e).sum(1)
        s2 = (weights * e * e).sum(1)
        means.append(mu)
        variances.append(s2 - mu * mu)
        raw.append(s2)
    e1 = sum(a * mu for a, mu in zip(spec.w1, means))
    e2 = sum(a * mu for a, mu in zip(spec.w2, means))
    v1 = sum(a * (var + (mu - e1) ** 2) for a, mu, var in zip(spec.w1, means, variances))
    v2 = sum(a * (var + (mu - e2) ** 2) for a, mu, var in zip(spec.w2, means, variances))
    bound = sum((a1 + a2) * s2 for a1, a2, s2 in zip(spec.w1, spec.w2, raw))
    return bound > max_cancellation * (v1 + v2 + (e1 - e2) ** 2)


def run(out_dir, rows=1000, vocab=32000, batch=100, seed=0):
    import torch

    from csd_kernels.contract import LossSpec, parse_weighting
    from csd_kernels.kernels import triton_backend as tb

    first_block = tb.forward_config(vocab, 2, tb.RAW_WARPS)[0]  # bf16 rows
    generator = torch.Generator().manual_seed(seed)
    out = []
    for peak in PEAKS:
        for noise in NOISES:
            counts = {w: 0 for w in WEIGHTINGS}
            top1 = 0.0
            for start in range(0, rows, batch):
                n = min(batch, rows - start)
                teacher = 2.0 * torch.randn(n, vocab, dtype=torch.float64, generator=generator)
                at = torch.randint(0, vocab, (n,), generator=generator)
                teacher[torch.arange(n), at] += peak
                student = teacher + noise * torch.randn(n, vocab, dtype=torch.float64, generator=generator)
                top1 += float(torch.softmax(teacher, 1).max(1).values.sum())
                for w in WEIGHTINGS:
                    spec = LossSpec(*parse_weighting(w), 1.0, 1.0)
                    counts[w] += int(flagged(student, teacher, spec, first_block, tb.MAX_CANCELLATION).sum())
            for w in WEIGHTINGS:
                out.append(dict(peak=peak, noise=noise, mean_top1=round(top1 / rows, 4), weighting=w,
                                flagged=round(counts[w] / rows, 4), rows=rows, vocab=vocab,
                                first_block=first_block, max_cancellation=tb.MAX_CANCELLATION))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "flag_rate.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    rows = run(args.out, args.rows, args.vocab)
    print(f"{len(rows)} rows -> {os.path.join(args.out, 'flag_rate.csv')} (a model of the raw pass's test, "
          "not a measurement)")


if __name__ == "__main__":
    main()
