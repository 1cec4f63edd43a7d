"""What the storage dtype of a top-k cache's log-probabilities costs in loss error (CPU, seconds).

    python -m benchmarks.topk_storage --out benchmarks/results/topk_storage.csv

Teacher logits shaped like a language model's (a few confident tokens over a Gaussian bulk, V = 32000),
a student near them; the cache is built in float32 and rounded to float16 or bfloat16, and
`topk_csd_loss` (tail bucket, "ts" and "ss") and `topk_kl_loss` are compared with the float32 cache:
the relative error of the per-position losses (median and max over positions) and of the gradient
(max |g - g32| / max |g32|). Written as one CSV row per (K, loss, dtype); README "Top-k teachers" quotes it.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

import csd_kernels

DTYPES = ("float16", "bfloat16")


def teacher_like(rows, vocab, generator):
    """Logits with 1-4 confident tokens per row over a N(0, 2^2) bulk."""
    logits = 2.0 * torch.randn(rows, vocab, generator=generator)
    peaks = torch.randint(0, vocab, (rows, 4), generator=generator)
    heights = 8.0 + 4.0 * torch.rand(rows, 4, generator=generator)
    return logits.scatter_(1, peaks, heights)


def measure(rows=256, vocab=32000, ks=(8, 32, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = teacher_like(rows, vocab, g)
    student = teacher + 1.5 * torch.randn(rows, vocab, generator=g)
    losses = {"csd-ts": dict(fn=csd_kernels.topk_csd_loss, weighting="ts"),
              "csd-ss": dict(fn=csd_kernels.topk_csd_loss, weighting="ss"),
              "kl-forward": dict(fn=csd_kernels.topk_kl_loss)}
    out = []
    for k in ks:
        ids, logprobs = csd_kernels.teacher_topk(teacher, k)
        for name, spec in losses.items():
            spec = dict(spec)
            fn = spec.pop("fn")

            def run(lp):
                s = student.clone().requires_grad_(True)
                loss = fn(s, ids, lp, reduction="none", backend="torch", **spec)
                loss.sum().backward()
                return loss.detach(), s.grad

            exact, exact_grad = run(logprobs)
            for dtype in DTYPES:
                stored = logprobs.to(getattr(torch, dtype))
                loss, grad = run(stored)
                rel = ((loss - exact).abs() / exact.abs().clamp_min(1e-12))
                out.append(dict(k=k, loss=name, dtype=dtype, rows=rows, vocab=vocab,
                                median_rel_loss_error=f"{rel.median().item():.3g}",
                                max_rel_loss_error=f"{rel.max().item():.3g}",
                                rel_grad_error=f"{((grad - exact_grad).abs().max() / exact_grad.abs().max()).item():.3g}",
                                bytes_per_position=k * (4 + torch.empty((), dtype=getattr(torch, dtype)).element_size())))
    return out


def markdown(rows):
    """README table: K = 32 rows of the CSV."""
    lines = ["| logprobs stored as | bytes per position (K = 32) | loss | median relative loss error | max | "
             "gradient error (max, relative) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if int(r["k"]) == 32:
            lines.append(f"| {r['dtype']} | {r['bytes_per_position']} | {r['loss']} | {r['median_rel_loss_error']} | "
                         f"{r['max_rel_loss_error']} | {r['rel_grad_error']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/topk_storage.csv")
    parser.add_argument("--readme", action="store_true", help="also copy the K = 32 table into README.md")
    args = parser.parse_args(argv)
    rows = measure()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(row)
    if args.readme:
        from .plots import write_between_markers

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        write_between_markers(os.path.join(root, "README.md"), "topk-storage", markdown(rows))


if __name__ == "__main__":
    main()
