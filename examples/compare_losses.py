"""Which distillation loss? CSD against KL, each tuned, over several seeds, on a task where mode-seeking matters.

The task (no download; every quantity below is exact because the source is known):
- The corpus is a Markov chain over V tokens whose next-token distributions are multimodal: each token has
  `--modes` likely successors (distinct tokens, weights within 2x of each other, so no mode dominates) sharing
  1 - `--floor` of the mass, and the rest is spread uniformly over the vocabulary.
- The teacher (GPT-2, 2 layers, width `--width`, vocabulary padded to a multiple of 64) learns it with
  cross-entropy. The student is capacity-limited: 1 layer and width `--student-width`. Its logits are a
  rank-`--student-width` map of the previous token, so it cannot put every mode of every token where the
  teacher does and has to choose between covering all the modes and fitting a few.

The methods (all through `csd_kernels`; the same optimiser, schedule and batches):
- CSD "ss" (mode-seeking), "ts" (mode-covering), "us" and the authors' TS-mix, against the teacher's logits;
- forward KL(T || S), reverse KL(S || T), and cross-entropy on the corpus alone (no teacher);
- offline top-8 CSD "ts" from a cache of the teacher's top-8 log-probabilities (with the tail bucket);
- on-policy CSD "ts": half of the batches are the student's own continuations of an 8-token prompt,
  scored by the teacher on the continuation positions.

The protocol:
1. Tuning: each method trains once (seed 0) at every learning rate of the grid; the rate with the best
   validation score wins (`--select own`: the method's own loss on the validation split, so each method
   gets the rate that best optimises what it optimises; `kl` or `coverage` select on a common metric).
2. Test: each method trains at its rate with fresh seeds (new initialisation and batch order) and is
   evaluated on the test split; mean and standard deviation over seeds, and curves over training.
3. Metrics, exact over the vocabulary at each test position (p the true next-token distribution, q the
   student's, T the teacher's): fidelity E_q[log p] (mode-seeking: is what the student says likely under
   the truth?), coverage E_p[log q] (mode-covering: does the student give mass to everything the truth
   does? the negative true cross-entropy), and agreement with the teacher: KL(T || q), CSD "ss" of q
   against T, next-token accuracy and the student's perplexity against the teacher, exp(E_T[-log q]).

AdamW (weight decay 0.01), linear warm-up over 5 % of the steps then cosine decay to 0, gradient clipping
at 1.0: the authors' recipe, the same for every method. The default finishes in under 5 minutes on 2 CPU
cores with a reduced protocol (it says so); `--full` runs the whole grid with 3 seeds and more steps, and
`--device cuda` a larger task. Writes examples/results/compare_losses.{md,csv,png} and
compare_losses_plane.png (`--readme` copies the table into README.md).
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill_tiny import batches, gpt2, sample_sequences, train_teacher, write_readme_table  # noqa: E402

from csd_kernels import csd_loss, kl_loss, teacher_topk, topk_csd_loss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TS_MIX = ({"teacher": 0.15, "student": 0.85},) * 2  # the authors' summarisation mixture
TOPK = 8
PROMPT = 8  # on-policy: tokens of a corpus sequence the student continues
ON_POLICY_FRACTION = 0.5

METHODS = {
    # name: (kind, weighting or KL direction)
    "CSD ss": ("csd", "ss"),
    "CSD ts": ("csd", "ts"),
    "CSD us": ("csd", "us"),
    "CSD TS-mix": ("csd", TS_MIX),
    "forward KL": ("kl", "forward"),
    "reverse KL": ("kl", "reverse"),
    "cross-entropy": ("ce", None),
    f"top-{TOPK} CSD ts (offline)": ("topk", "ts"),
    "on-policy CSD ts": ("on-policy", "ts"),
}

# Protocols: (learning-rate grid, test seeds, student steps). The grid spans 10x in both.
PROTOCOLS = {
    "default": ((3e-2, 1e-1, 3e-1), 3, 300),
    "full": ((3e-3, 1e-2, 3e-2, 1e-1, 3e-1), 3, 1200),
}
# --device cuda: a larger task (CPU defaults in parse_arguments). The cached teacher logits of the training
# split take train_sequences x (seq_len - 1) x vocab x 4 bytes: 5 GB of GPU memory here.
CUDA_SIZES = dict(vocab=2000, width=256, student_width=48, seq_len=64, batch_size=64, teacher_steps=3000,
                  train_sequences=10000, eval_sequences=1024)


# ----------------------------------------------------------------------------------------------- the task
def multimodal_chain(vocab: int, modes: int, floor: float, generator: torch.Generator) -> torch.Tensor:
    """(V, V) transition matrix: `modes` distinct likely successors per token share 1 - floor (weights
    uniform in [1, 2], normalised), and `floor` is spread uniformly, so every log-probability is finite."""
    probs = torch.full((vocab, vocab), floor / vocab)
    for token in range(vocab):
        successors = torch.randperm(vocab, generator=generator)[:modes]
        weights = 1 + torch.rand(modes, generator=generator)  # within 2x of each other: no mode dominates
        probs[token, successors] += (1 - floor) * weights / weights.sum()
    return probs


class Split:
    """Sequences of one split with the teacher's logits over the student's vocabulary (V), cached once:
    the teacher is frozen, so every off-policy method sees exactly what an online teacher would give."""

    def __init__(self, ids: torch.Tensor, teacher, vocab: int, batch_size: int, device):
        self.ids = ids.to(device)
        with torch.no_grad():
            self.teacher = torch.cat([teacher(input_ids=self.ids[i : i + batch_size]).logits[:, :-1, :vocab].float()
                                      for i in range(0, len(ids), batch_size)])
        self.topk = teacher_topk(self.teacher, TOPK)  # (ids int64, logprobs): the offline cache
        self.topk = (self.topk[0].to(torch.int32), self.topk[1])


def make_teacher(args, train: torch.Tensor, device):
    padded_vocab = -(-args.vocab // 64) * 64
    teacher = gpt2(padded_vocab, 2, args.width, args.seq_len, seed=args.data_seed).to(device)
    return train_teacher(teacher, train, args.teacher_lr, args.teacher_steps, args.batch_size, args.data_seed,
                         device, log_every=200)


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def evaluate(model, split: Split, log_truth: torch.Tensor, vocab: int, batch_size: int) -> dict:
    """The metrics of the module docstring over every position of `split` (means per position)."""
    sums = dict.fromkeys(("fidelity", "coverage", "kl", "csd", "accuracy", "teacher_ce"), 0.0)
    for i in range(0, len(split.ids), batch_size):
        ids = split.ids[i : i + batch_size]
        log_q = torch.log_softmax(model(input_ids=ids).logits[:, :-1, :vocab].float(), -1)
        log_p = log_truth[ids[:, :-1]]  # the chain's next-token log-probabilities at every position
        teacher = split.teacher[i : i + batch_size]
        sums["fidelity"] += (log_q.exp() * log_p).sum().item()
        sums["coverage"] += (log_p.exp() * log_q).sum().item()
        sums["kl"] += kl_loss(log_q, teacher, reduction="sum").item()
        sums["csd"] += csd_loss(log_q, teacher, weighting="ss", reduction="sum").item()
        sums["accuracy"] += (log_q.argmax(-1) == ids[:, 1:]).sum().item()
        sums["teacher_ce"] += -(torch.softmax(teacher, -1) * log_q).sum().item()
    out = {k: v / (split.ids.shape[0] * (split.ids.shape[1] - 1)) for k, v in sums.items()}
    out["perplexity_vs_teacher"] = math.exp(out.pop("teacher_ce"))
    return out


def own_loss(method: str, logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor, topk, labels=None):
    """The training objective of `method` on next-token logits (b, L-1, V) of sequences `ids` (b, L)."""
    kind, how = METHODS[method]
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if kind == "kl":
        return kl_loss(logits, teacher, kind=how, labels=labels)
    if kind == "topk":
        return topk_csd_loss(logits, *topk, weighting=how, labels=labels)
    return csd_loss(logits, teacher, weighting=how, labels=labels)  # csd, on-policy


@torch.no_grad()
def validation_score(method, student, split: Split, log_truth, args) -> float:
    """The number --select minimises on the validation split."""
    if args.select == "own":
        total = 0.0
        for i in range(0, len(split.ids), args.batch_size):
            ids = split.ids[i : i + args.batch_size]
            topk = tuple(x[i : i + args.batch_size] for x in split.topk)
            logits = student(input_ids=ids).logits[:, :-1, : args.vocab]
            total += own_loss(method, logits, ids, split.teacher[i : i + args.batch_size], topk).item() * len(ids)
        return total / len(split.ids)
    metrics = evaluate(student, split, log_truth, args.vocab, args.batch_size)
    return metrics["kl"] if args.select == "kl" else -metrics["coverage"]


# ------------------------------------------------------------------------------------------------ training
@torch.no_grad()
def continue_with(student, prompts: torch.Tensor, length: int, vocab: int, generator) -> torch.Tensor:
    """The student's own samples (temperature 1) continuing `prompts` (b, PROMPT) to `length` tokens."""
    ids = prompts
    while ids.shape[1] < length:
        probs = torch.softmax(student(input_ids=ids).logits[:, -1, :vocab].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)], 1)
    return ids


def train_student(method, lr, seed, train: Split, eval_split: Split, teacher, log_truth, args, steps, curve_every):
    """Train one student; returns (student, [(step, metrics on eval_split)])."""
    student = gpt2(args.vocab, 1, args.student_width, args.seq_len, seed=1000 + seed).to(train.ids.device)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    order = batches(torch.arange(len(train.ids)), args.batch_size, torch.Generator().manual_seed(2000 + seed))
    generator = torch.Generator().manual_seed(3000 + seed)  # on-policy draws: the batch order stays the same
    curve = []
    for step in range(steps + 1):
        if curve_every and (step % curve_every == 0 or step == steps):
            student.eval()
            curve.append((step, evaluate(student, eval_split, log_truth, args.vocab, args.batch_size)))
            student.train()
        if step == steps:
            break
        rows = next(order).to(train.ids.device)
        ids, teacher_logits, topk, labels = train.ids[rows], train.teacher[rows], None, None
        topk = tuple(x[rows] for x in train.topk)
        if METHODS[method][0] == "on-policy" and torch.rand((), generator=generator) < ON_POLICY_FRACTION:
            student.eval()
            ids = continue_with(student, ids[:, :PROMPT], args.seq_len, args.vocab, generator)
            student.train()
            teacher_logits = teacher(input_ids=ids).logits[:, :-1, : args.vocab].float()
            labels = ids[:, 1:].clone()
            labels[:, : PROMPT - 1] = -100  # score the student's own tokens only
        logits = student(input_ids=ids).logits[:, :-1, : args.vocab]
        loss = own_loss(method, logits, ids, teacher_logits, topk, labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        schedule.step()
    student.eval()
    return student, curve


_STATE = {}  # the splits, teacher and arguments, set by main() before the worker processes fork


def run_one(task):
    """One student run in this process, single-threaded so that the result does not depend on --workers:
    (task, validation score) for a tuning run, (task, test curve) for a test run."""
    torch.set_num_threads(1)
    method, lr, seed, phase = task
    st, args = _STATE, _STATE["args"]
    t0 = time.time()
    if phase == "tune":
        student, _ = train_student(method, lr, seed, st["train"], st["val"], st["teacher"], st["log_truth"], args,
                                   args.steps, 0)
        result = validation_score(method, student, st["val"], st["log_truth"], args)
        summary = f"validation {args.select} score {result:.4f}"
    else:
        _, result = train_student(method, lr, seed, st["train"], st["test"], st["teacher"], st["log_truth"],
                                  args, args.steps, max(1, args.steps // args.curve_points))
        m = result[-1][1]
        summary = (f"test fidelity {m['fidelity']:.3f} coverage {m['coverage']:.3f} KL {m['kl']:.4f} "
                   f"accuracy {m['accuracy']:.4f}")
    return task, result, f"{method} lr {lr:g} seed {seed}: {summary} ({time.time() - t0:.1f} s)"


def run_all(tasks, workers):
    """Yield (task, result) for every task, `workers` processes at a time, with a progress line each."""
    threads = torch.get_num_threads()
    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers)
        stream = pool.imap_unordered(run_one, tasks)
    else:
        pool, stream = None, map(run_one, tasks)
    try:
        for done, (task, result, line) in enumerate(stream, 1):
            print(f"  [{done}/{len(tasks)}] {line}", flush=True)
            yield task, result
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.close()
            pool.join()


# ------------------------------------------------------------------------------------------------- report
def mean_sd(values):
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


# (key, column title, higher is better, format)
COLUMNS = (("fidelity", "fidelity E_q[log p] ↑", True, "{:.3f}"),
           ("coverage", "coverage E_p[log q] ↑", True, "{:.3f}"),
           ("kl", "KL(T ‖ q) ↓", False, "{:.4f}"),
           ("csd", "CSD ss ↓", False, "{:.4f}"),
           ("accuracy", "accuracy ↑", True, "{:.4f}"),
           ("perplexity_vs_teacher", "perplexity vs teacher ↓", False, "{:.2f}"))


def results_table(finals: dict, seeds: int) -> list:
    """Markdown rows, mean ± sd over seeds. Per column, the best mean is bold; a ≈ marks the means whose
    difference from the best is within noise: under 2 standard errors of the difference, sqrt(sd_a^2 / n
    + sd_b^2 / n) with n seeds."""
    header = "| student trained with | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    rows = [header, "|" + " --- |" * (len(COLUMNS) + 1)]
    stats = {m: {k: mean_sd([f[k] for f in runs]) for k, *_ in COLUMNS} for m, runs in finals.items()}
    cells = {m: [] for m in finals}
    for key, _, higher, fmt in COLUMNS:
        best = (max if higher else min)(finals, key=lambda m: stats[m][key][0])
        b_mean, b_sd = stats[best][key]
        for m in finals:
            mean, sd = stats[m][key]
            text = f"{fmt.format(mean)} ± {fmt.format(sd)}"
            if m == best:
                text = f"**{text}**"
            elif abs(mean - b_mean) < 2 * math.sqrt((sd ** 2 + b_sd ** 2) / seeds):
                text = f"≈ {text}"
            cells[m].append(text)
    for m in finals:
        rows.append(f"| {m} | " + " | ".join(cells[m]) + " |")
    return rows


def plot(curves: dict, finals: dict, references: dict, out: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("fidelity", "coverage", "kl", "accuracy")
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    for m, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        style = "-" if METHODS[m][0] in ("csd", "topk", "on-policy") else "--"
        for ax, key in zip(axes, keys):
            per_step = [mean_sd([run[i][1][key] for run in runs]) for i in range(len(steps))]
            mean = [a for a, _ in per_step]
            sd = [b for _, b in per_step]
            line, = ax.plot(steps, mean, style, label=m)
            ax.fill_between(steps, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes, keys):
        for name, metrics in references.items():
            if key in metrics and key != "kl":  # the teacher's KL to itself is 0
                ax.axhline(metrics[key], color="black" if name == "teacher" else "gray",
                           linestyle=":" if name == "teacher" else "-.", linewidth=1, label=name)
        ax.set_title({"fidelity": "fidelity E_q[log p] (higher: mode-seeking)",
                      "coverage": "coverage E_p[log q] (higher: mode-covering)",
                      "kl": "KL(teacher || student)", "accuracy": "next-token accuracy"}[key], fontsize=10)
        ax.set_xlabel("student step")
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    for ax, key in zip(axes[:2], keys[:2]):  # the y range of the last three quarters of training
        late = [m[key] for runs in curves.values() for run in runs for step, m in run if 4 * step >= run[-1][0]]
        ax.set_ylim(min(late) - 0.1, references["truth"][key] + 0.1)
    axes[3].legend(fontsize=7)
    fig.suptitle(f"Test-split curves, mean ± sd over seeds: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare_losses.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 6))
    points = {}  # methods with the very same runs (CSD ss and reverse KL: the same gradient) share a point
    for m, runs in finals.items():
        points.setdefault(tuple((r["fidelity"], r["coverage"]) for r in runs), []).append(m)
    for runs, names in points.items():
        fx, fsd = mean_sd([f for f, _ in runs])
        cx, csd = mean_sd([c for _, c in runs])
        marker = "o" if METHODS[names[0]][0] in ("csd", "topk", "on-policy") else "s"
        ax.errorbar(cx, fx, xerr=csd, yerr=fsd, fmt=marker, capsize=3, label=" = ".join(names))
        ax.annotate(" = ".join(names), (cx, fx), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for name, metrics in references.items():
        ax.plot(metrics["coverage"], metrics["fidelity"], "*", markersize=12,
                color="black" if name == "teacher" else "gray", label=name)
    ax.set_xlabel("coverage E_p[log q]  (right: covers the true modes)")
    ax.set_ylabel("fidelity E_q[log p]  (up: says only likely tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Fidelity vs coverage on the test split (mean ± sd)\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare_losses_plane.png"), dpi=100)
    plt.close(fig)


def commit() -> str:
    """The commit the run came from, with '+changes' when the checkout differs from it (package or example)."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csd_kernels", "examples/compare_losses.py",
                                "examples/distill_tiny.py"], cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------------------- main
def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole grid, 3 seeds, more steps")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a larger task")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid (default: the protocol's)")
    parser.add_argument("--seeds", type=int, help="test seeds per method (default: the protocol's)")
    parser.add_argument("--steps", type=int, help="student steps per run (default: the protocol's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--select", choices=("own", "kl", "coverage"), default="own",
                        help="validation score that picks each method's learning rate")
    parser.add_argument("--vocab", type=int, default=250)
    parser.add_argument("--modes", type=int, default=3, help="likely successors per token")
    parser.add_argument("--floor", type=float, default=0.05, help="mass spread uniformly over the vocabulary")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--width", type=int, default=128, help="teacher width (2 layers)")
    parser.add_argument("--student-width", type=int, default=16, help="student width (1 layer)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--teacher-lr", type=float, default=1e-2)
    parser.add_argument("--train-sequences", type=int, default=4000)
    parser.add_argument("--eval-sequences", type=int, default=256, help="validation and test, each")
    parser.add_argument("--curve-points", type=int, default=16, help="evaluations along each test run")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="student runs in parallel on a CPU (processes of one thread; results do not depend on it)")
    parser.add_argument("--data-seed", type=int, default=0, help="chain, corpus and teacher")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--readme", action="store_true", help="copy the table into README.md")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):  # scale the task up unless a size was given on the command line
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for name, value in CUDA_SIZES.items():
            if name not in given:
                setattr(args, name, value)
    protocol = "full" if args.full else "default"
    lrs, seeds, steps = PROTOCOLS[protocol]
    args.protocol = protocol
    args.lrs = tuple(args.lrs or lrs)
    args.seeds = args.seeds or seeds
    args.steps = args.steps or steps
    return args


def main(argv=None):
    args = parse_arguments(argv)
    start = time.time()
    device = torch.device(args.device)
    settings = (f"protocol {args.protocol}: learning rates {', '.join(f'{lr:g}' for lr in args.lrs)} (tuned on "
                f"seed 0, selected by {args.select} validation score), {args.seeds} test seeds, {args.steps} steps; "
                f"vocabulary {args.vocab}, {args.modes} modes + floor {args.floor}, student width "
                f"{args.student_width} (1 layer) vs teacher {args.width} (2 layers), batch {args.batch_size} x "
                f"{args.seq_len} tokens, device {args.device}, commit {commit()}")
    print(settings)
    if args.protocol == "default":
        full_lrs, full_seeds, full_steps = PROTOCOLS["full"]
        print(f"  (the default protocol is reduced to fit 5 minutes on 2 CPU cores: {len(args.lrs)} learning rates, "
              f"{args.seeds} test seeds, {args.steps} steps; --full runs {len(full_lrs)} rates, {full_seeds} seeds, "
              f"{full_steps} steps)")

    g = torch.Generator().manual_seed(args.data_seed)
    truth = multimodal_chain(args.vocab, args.modes, args.floor, g)
    log_truth = truth.log().to(device)
    train_ids, val_ids, test_ids = (sample_sequences(truth, n, args.seq_len, g) for n in
                                    (args.train_sequences, args.eval_sequences, args.eval_sequences))
    print(f"teacher: GPT-2, 2 layers, width {args.width}, {args.teacher_steps} steps")
    teacher = make_teacher(args, train_ids, device)
    train, val, test = (Split(ids, teacher, args.vocab, args.batch_size, device)
                        for ids in (train_ids, val_ids, test_ids))
    entropy = -(truth * truth.log()).sum(-1)[test_ids[:, :-1]].mean().item()
    references = {"truth": {"fidelity": -entropy, "coverage": -entropy},
                  "teacher": evaluate(teacher, test, log_truth, args.vocab, args.batch_size)}
    print(f"  teacher on the test split: fidelity {references['teacher']['fidelity']:.3f}, coverage "
          f"{references['teacher']['coverage']:.3f} (truth: {-entropy:.3f} both), accuracy "
          f"{references['teacher']['accuracy']:.4f}", flush=True)

    _STATE.update(train=train, val=val, test=test, teacher=teacher, log_truth=log_truth, args=args)
    workers = args.workers if args.device == "cpu" and "fork" in multiprocessing.get_all_start_methods() else 1
    print(f"  {len(args.methods) * (len(args.lrs) + args.seeds)} student runs, {workers} at a time "
          "(one thread each)", flush=True)
    # 1. tuning: every method at every rate, seed 0, scored on the validation split
    tune = [(method, lr, 0, "tune") for method in args.methods for lr in args.lrs]
    scores = {}
    for (method, lr, _, _), score in run_all(tune, workers):
        scores[method, lr] = score
    rows = [dict(phase="tune", method=m, lr=lr, seed=0, step=args.steps, split="validation", score=scores[m, lr])
            for m, lr, _, _ in tune]
    tuning = {m: {lr: scores[m, lr] for lr in args.lrs} for m in args.methods}
    chosen = {m: min(args.lrs, key=lambda lr: scores[m, lr] if math.isfinite(scores[m, lr]) else math.inf)
              for m in args.methods}
    # 2. test: fresh seeds at the chosen rate, curves on the test split
    test_runs = [(method, chosen[method], seed, "test") for method in args.methods
                 for seed in range(1, args.seeds + 1)]
    results = dict(run_all(test_runs, workers))
    curves = {m: [results[m, chosen[m], seed, "test"] for seed in range(1, args.seeds + 1)] for m in args.methods}
    finals = {m: [curve[-1][1] for curve in runs] for m, runs in curves.items()}
    for (method, lr, seed, _) in test_runs:
        rows.extend(dict(phase="test", method=method, lr=lr, seed=seed, step=step, split="test", **metrics)
                    for step, metrics in results[method, lr, seed, "test"])

    os.makedirs(args.out, exist_ok=True)
    title = (f"{args.protocol} protocol, {args.seeds} seeds, {args.steps} steps, V={args.vocab}, "
             f"{args.modes} modes, student width {args.student_width} vs teacher {args.width}")
    plot(curves, finals, references, args.out, title)
    fields = ["phase", "method", "lr", "seed", "step", "split", "score"] + [k for k, *_ in COLUMNS]
    with open(os.path.join(args.out, "compare_losses.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)

    lines = [f"Test split, mean ± sd over {args.seeds} seeds at each method's tuned learning rate ({settings}).",
             "", *results_table(finals, args.seeds), "",
             "| reference | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |",
             "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, metrics in references.items():
        cells = [fmt.format(metrics[k]) if k in metrics else "" for k, _, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Learning rate chosen on the validation split ({args.select} score, lower is better; seed 0):", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
              "|" + " --- |" * (len(args.lrs) + 1)]
    for method, scores in tuning.items():
        cells = [f"**{scores[lr]:.4f}**" if lr == chosen[method] else f"{scores[lr]:.4f}" for lr in args.lrs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    edge = [m for m in args.methods if len(args.lrs) > 1 and chosen[m] in (min(args.lrs), max(args.lrs))]
    if edge:
        lines += ["", f"Chosen at an end of the grid (a wider grid might do better): {', '.join(edge)}."]
    with open(os.path.join(args.out, "compare_losses.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/compare_losses.{{md,csv,png}} and compare_losses_plane.png in "
          f"{time.time() - start:.0f} s")
    if args.readme:
        write_readme_table("compare_losses", lines)


if __name__ == "__main__":
    main()
