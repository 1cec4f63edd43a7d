"""Offline top-k distillation of the tiny GPT-2 teacher, beside the dense online run.

The corpus, teacher and student of `distill_tiny.py` (a sparse Markov chain, a 2-layer GPT-2 teacher, a
1-layer student, no download). The teacher runs once over the training set to cache its top-k
log-probabilities (`csd_kernels.teacher_topk`: int32 ids and float32 logprobs, K x 8 bytes a position);
the students then train from that cache alone, with no teacher in the loop:

- "online CSD ts": `causal_lm_csd_loss` against the teacher's full logits, run at every step;
- "top-8 CSD ts", "top-32 CSD ts": `topk_csd_loss` from the cache, with the tail bucket;
- "top-32 CSD ts, no tail": the support alone;
- "top-32 forward KL": `topk_kl_loss` from the same cache.

Every run starts from the same initialisation and sees the same batches, and is evaluated on held-out
sequences against the full teacher as in `distill_tiny.py`. Writes examples/results/distill_topk.png and
distill_topk.md (add --readme to copy the table into README.md).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill_tiny import (  # noqa: E402
    batches,
    corpus_and_teacher,
    evaluate,
    gpt2,
    parse_arguments,
    save_table,
)

from csd_kernels import teacher_topk, topk_csd_loss, topk_kl_loss  # noqa: E402
from csd_kernels.integrations.transformers import causal_lm_csd_loss  # noqa: E402

METHODS = {
    # name: (K or None for the online run, loss, tail)
    "online CSD ts": (None, "csd", True),
    "top-8 CSD ts": (8, "csd", True),
    "top-32 CSD ts": (32, "csd", True),
    "top-32 CSD ts, no tail": (32, "csd", False),
    "top-32 forward KL": (32, "kl", True),
}


@torch.no_grad()
def cache_topk(teacher, data, k, vocab, batch_size, device):
    """The teacher's top-k over the student's vocabulary (its first `vocab` entries) for every position."""
    ids, logprobs = [], []
    for start in range(0, len(data), batch_size):
        logits = teacher(input_ids=data[start : start + batch_size].to(device)).logits[..., :vocab]
        top_ids, top_logprobs = teacher_topk(logits, k)
        ids.append(top_ids.to(torch.int32).cpu())
        logprobs.append(top_logprobs.cpu())
    return torch.cat(ids), torch.cat(logprobs)


def distill(method, teacher, train, caches, held_out, args, device):
    k, loss_kind, tail = METHODS[method]
    student = gpt2(args.vocab, 1, args.width // 2, args.seq_len, seed=args.seed + 1).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + 2)
    order = batches(torch.arange(len(train)), args.batch_size, generator)  # the same batches for every run
    curve = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            student.eval()
            curve.append((step, evaluate(student, teacher, held_out, args.vocab, args.batch_size)))
            student.train()
        if step == args.steps:
            break
        rows = next(order)
        ids = train[rows].to(device)
        logits = student(input_ids=ids).logits
        if k is None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            loss = causal_lm_csd_loss(logits, teacher_logits, ids, weighting="ts")
        else:
            top_ids, top_logprobs = (x[rows][:, :-1].to(device) for x in caches[k])
            if loss_kind == "csd":
                loss = topk_csd_loss(logits[:, :-1], top_ids, top_logprobs, weighting="ts", tail=tail)
            else:
                loss = topk_kl_loss(logits[:, :-1], top_ids, top_logprobs, tail=tail)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = curve[-1][1]
    print(f"  {method:24s} KL {final['kl']:.4f}  CSD {final['csd']:.4f}  accuracy {final['accuracy']:.4f}  "
          f"perplexity vs teacher {final['perplexity_vs_teacher']:.2f}")
    return curve


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, curve in curves.items():
        steps = [s for s, _ in curve]
        style = "-" if METHODS[method][0] is None else "--"
        for ax, key in zip(axes, ("kl", "accuracy")):
            ax.plot(steps, [m[key] for _, m in curve], style, marker="o", markersize=3, label=method)
    axes[0].set_yscale("log")
    axes[0].set_title("held-out KL(teacher || student), full vocabulary")
    axes[1].set_title("held-out next-token accuracy")
    for ax in axes:
        ax.set_xlabel("student training step")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Offline top-k distillation vs the online dense teacher (synthetic Markov corpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_arguments(argv, __doc__.splitlines()[0])
    start = time.time()
    device, _, train, held_out, teacher = corpus_and_teacher(args)
    caches = {k: cache_topk(teacher, train, k, args.vocab, args.batch_size, device)
              for k in sorted({m[0] for m in METHODS.values() if m[0]})}
    positions = train.numel()
    dense_bytes = positions * args.vocab * 4
    print(f"cached the teacher's top-k over {positions} positions: "
          + ", ".join(f"K={k}: {positions * k * 8 / 1e6:.1f} MB" for k in caches)
          + f" (fp32 logits would be {dense_bytes / 1e6:.0f} MB)")

    curves = {method: distill(method, teacher, train, caches, held_out, args, device) for method in METHODS}
    os.makedirs(args.out, exist_ok=True)
    plot(curves, os.path.join(args.out, "distill_topk.png"))
    lines = [
        f"Held-out metrics after {args.steps} student steps (vocabulary {args.vocab}, seed {args.seed}; one run "
        f"each, same batches): the teacher's top-k cached once, int32 ids + float32 logprobs.",
        "",
        "| student trained with | teacher bytes per position | KL(teacher ‖ student) | CSD (ss) | "
        "next-token accuracy | perplexity vs teacher |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, curve in curves.items():
        k = METHODS[method][0]
        m = curve[-1][1]
        teacher_bytes = "online (teacher runs)" if k is None else f"{k * 8}"
        lines.append(f"| {method} | {teacher_bytes} | {m['kl']:.4f} | {m['csd']:.4f} | {m['accuracy']:.4f} | "
                     f"{m['perplexity_vs_teacher']:.2f} |")
    save_table(args, "distill_topk", lines, start)


if __name__ == "__main__":
    main()
