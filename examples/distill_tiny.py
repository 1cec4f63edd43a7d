"""Distil a tiny GPT-2 end to end, with no download: CSD ("ss", "ts") against forward KL and hard labels.

1. Generate a corpus from a random sparse Markov chain over V tokens (each token has a few likely
   successors), so there is structure to learn and the best achievable next-token accuracy is known.
2. Train a teacher (GPT-2, 2 layers) on it with cross-entropy. Its vocabulary is padded to a multiple
   of 64, as real models do; the student's is not.
3. From the same initialisation and seed, train a smaller student (1 layer) for the same number of
   steps with: CSD "ss", CSD "ts", forward KL (`csd_kernels.kl_loss`) and, as a baseline, plain
   cross-entropy on the corpus (no teacher).
4. Every few steps, evaluate on held-out sequences: KL(teacher || student), CSD, next-token accuracy,
   and the student's perplexity against the teacher (exp of the cross-entropy of the student's
   predictions under the teacher's distribution).

Writes examples/results/distill_tiny.png (curves) and distill_tiny.md (final metrics).
Default settings finish in a few minutes on 2 CPU cores; for a bigger run on a GPU, for example:
    python examples/distill_tiny.py --device cuda --vocab 8000 --steps 2000 --teacher-steps 3000 \\
        --width 256 --batch-size 64 --seq-len 128
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from csd_kernels import csd_loss, kl_loss
from csd_kernels.integrations.transformers import causal_lm_csd_loss

HERE = os.path.dirname(os.path.abspath(__file__))


def markov_chain(vocab: int, successors: int, generator: torch.Generator) -> torch.Tensor:
    """(V, V) transition matrix: each row puts Dirichlet-random mass on `successors` random tokens."""
    probs = torch.zeros(vocab, vocab)
    for token in range(vocab):
        nxt = torch.randperm(vocab, generator=generator)[:successors]
        weights = torch.distributions.Dirichlet(torch.full((successors,), 0.5)).sample()
        probs[token, nxt] = weights
    return probs


def sample_sequences(probs: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, probs.shape[0], (n,), generator=generator)
    for i in range(1, length):
        ids[:, i] = torch.multinomial(probs[ids[:, i - 1]], 1, generator=generator).squeeze(1)
    return ids


def gpt2(vocab: int, layers: int, width: int, seq_len: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 32), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


@torch.no_grad()
def evaluate(student, teacher, data: torch.Tensor, vocab: int, batch_size: int) -> dict:
    totals = {"kl": 0.0, "csd": 0.0, "accuracy": 0.0, "cross_entropy": 0.0}
    count = 0
    for start in range(0, len(data), batch_size):
        ids = data[start : start + batch_size]
        s = student(input_ids=ids).logits[:, :-1, :vocab].float()
        t = teacher(input_ids=ids).logits[:, :-1, :vocab].float()
        target = ids[:, 1:]
        n = target.numel()
        totals["kl"] += kl_loss(s, t).item() * n
        totals["csd"] += csd_loss(s, t).item() * n
        totals["accuracy"] += (s.argmax(-1) == target).float().sum().item()
        # cross-entropy of the student under the teacher's distribution: E_T[-log p_S]
        totals["cross_entropy"] += -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).sum().item()
        count += n
    out = {k: v / count for k, v in totals.items()}
    out["perplexity_vs_teacher"] = math.exp(out.pop("cross_entropy"))
    return out


def batches(data: torch.Tensor, batch_size: int, generator: torch.Generator):
    while True:
        for rows in torch.randperm(len(data), generator=generator).split(batch_size):
            if len(rows) == batch_size:
                yield data[rows]


def train_teacher(teacher, data, lr, steps, batch_size, seed, device, log_every=100):
    """Fit `teacher` to `data` with the usual next-token cross-entropy (AdamW at `lr`), then freeze it."""
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr)
    stream = batches(data, batch_size, torch.Generator().manual_seed(seed))
    teacher.train()
    for step in range(steps):
        ids = next(stream).to(device)
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  teacher step {step:5d}  cross-entropy {loss.item():.3f}", flush=True)
    teacher.eval()
    return teacher.requires_grad_(False)


def distill(method, teacher, train, held_out, args, device):
    student = gpt2(args.vocab, 1, args.width // 2, args.seq_len, seed=args.seed + 1).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    stream = batches(train, args.batch_size, torch.Generator().manual_seed(args.seed + 2))
    curve = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            student.eval()
            curve.append((step, evaluate(student, teacher, held_out, args.vocab, args.batch_size)))
            student.train()
        if step == args.steps:
            break
        ids = next(stream).to(device)
        logits = student(input_ids=ids).logits
        if method == "cross-entropy":  # hard labels only, no teacher
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits  # padded vocabulary: V_t >= V_s
            if method == "forward KL":
                loss = kl_loss(logits[:, :-1], teacher_logits[:, :-1, : args.vocab])
            else:
                loss = causal_lm_csd_loss(logits, teacher_logits, ids, weighting=method.split()[-1],
                                          temperature=args.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = curve[-1][1]
    print(f"  {method:14s} KL {final['kl']:.4f}  CSD {final['csd']:.4f}  accuracy {final['accuracy']:.4f}  "
          f"perplexity vs teacher {final['perplexity_vs_teacher']:.2f}")
    return curve


def plot(curves, teacher_accuracy, best_accuracy, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, curve in curves.items():
        steps = [s for s, _ in curve]
        for ax, key in zip(axes, ("kl", "accuracy", "perplexity_vs_teacher")):
            ax.plot(steps, [m[key] for _, m in curve], marker="o", markersize=3, label=method)
    axes[0].set_yscale("log")
    axes[0].set_title("held-out KL(teacher || student)")
    axes[1].axhline(teacher_accuracy, color="black", linestyle="--", linewidth=1, label="teacher")
    axes[1].axhline(best_accuracy, color="gray", linestyle=":", linewidth=1, label="Bayes-optimal")
    axes[1].set_title("held-out next-token accuracy")
    axes[2].set_yscale("log")
    axes[2].set_title("student perplexity against the teacher")
    for ax in axes:
        ax.set_xlabel("student training step")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Distilling a 2-layer GPT-2 teacher into a 1-layer student (synthetic Markov corpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme_table(name, lines):
    """Replace README.md's text between <!-- example:NAME --> and <!-- /example:NAME --> with `lines`."""
    readme = os.path.join(os.path.dirname(HERE), "README.md")
    begin, end = f"<!-- example:{name} -->", f"<!-- /example:{name} -->"
    head, rest = open(readme).read().split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{begin}\n" + "\n".join(lines) + f"\n{end}{tail}")


def parse_arguments(argv, description):
    """The examples' shared command line: corpus, models, training and output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--successors", type=int, default=4, help="likely next tokens per token")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--width", type=int, default=128, help="teacher width (the student's is half)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200, help="student steps per method")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--train-sequences", type=int, default=4000)
    parser.add_argument("--held-out-sequences", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--readme", action="store_true",
                        help="also copy the metrics table into README.md (between its example markers)")
    return parser.parse_args(argv)


def corpus_and_teacher(args):
    """(device, transition matrix, train and held-out sequences, trained teacher), from args.seed."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    probs = markov_chain(args.vocab, args.successors, g)
    train = sample_sequences(probs, args.train_sequences, args.seq_len, g)
    held_out = sample_sequences(probs, args.held_out_sequences, args.seq_len, g).to(device)
    padded_vocab = -(-args.vocab // 64) * 64
    print(f"teacher: GPT-2, 2 layers, width {args.width}, vocabulary {padded_vocab} (padded from {args.vocab})")
    teacher = gpt2(padded_vocab, 2, args.width, args.seq_len, seed=args.seed).to(device)
    train_teacher(teacher, train, args.lr, args.teacher_steps, args.batch_size, args.seed, device)
    return device, probs, train, held_out, teacher


def save_table(args, name, lines, start):
    """Write DIR/<name>.md, print it, and copy it into README.md with --readme."""
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/{name}.png and {name}.md in {time.time() - start:.0f} s")
    if args.readme:
        write_readme_table(name, lines)


def main(argv=None):
    args = parse_arguments(argv, __doc__.splitlines()[0])
    start = time.time()
    device, probs, train, held_out, teacher = corpus_and_teacher(args)
    best_accuracy = probs.max(-1).values[held_out[:, :-1].cpu()].mean().item()
    teacher_metrics = evaluate(teacher, teacher, held_out, args.vocab, args.batch_size)
    print(f"  teacher held-out accuracy {teacher_metrics['accuracy']:.4f} (Bayes-optimal {best_accuracy:.4f})")

    print(f"students: GPT-2, 1 layer, width {args.width // 2}, {args.steps} steps each")
    curves = {}
    for method in ("CSD ss", "CSD ts", "forward KL", "cross-entropy"):
        curves[method] = distill(method, teacher, train, held_out, args, device)

    os.makedirs(args.out, exist_ok=True)
    plot(curves, teacher_metrics["accuracy"], best_accuracy, os.path.join(args.out, "distill_tiny.png"))
    lines = [
        f"Held-out metrics after {args.steps} student steps (vocabulary {args.vocab}, seed {args.seed}; "
        f"teacher accuracy {teacher_metrics['accuracy']:.4f}, Bayes-optimal {best_accuracy:.4f}):",
        "",
        "| student trained with | KL(teacher ‖ student) | CSD (ss) | next-token accuracy | perplexity vs teacher |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, curve in curves.items():
        m = curve[-1][1]
        lines.append(f"| {method} | {m['kl']:.4f} | {m['csd']:.4f} | {m['accuracy']:.4f} | "
                     f"{m['perplexity_vs_teacher']:.2f} |")
    save_table(args, "distill_tiny", lines, start)


if __name__ == "__main__":
    main()
