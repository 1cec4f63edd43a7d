"""The CPU path against `torch.compile` of a naive forward KL, side by side in one process (issue 17).

For every (N, V, dtype) of the target grid, each provider's forward + backward is timed (median of 9
after 2 warm-ups, the first of which compiles; the providers take turns, round by round, in a shuffled
order, on the same inputs) and divided by the time of `compiled-naive-kl` in the same rounds: the `ratio` column, whose
target is <= 1.1. Separately, the one-off
compilation a user meets on a first call: `first_call_s` is the first forward + backward of each
provider at a small shape in a fresh process with empty Inductor and C++-extension caches,
`cached_first_call_s` the same in a second process that finds the first one's on-disk caches, `warm_call_s` the second call.

    python -m benchmarks.cpu_target [--quick] [--out benchmarks/results/cpu] [--readme]

Writes DIR/cpu_target.csv (long format: provider, N, V, dtype, metric, value) and, with --readme, the
table between <!-- cpu-target --> markers in README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PROVIDERS = ("compiled-naive-kl", "naive-kl", "csd-ss", "csd-ts", "csd-us", "csd-mix", "kl-forward", "kl-reverse",
             "csd-ss+ce", "topk64-csd-ss", "csd-ss-chunked")
GRID = [(n, v, d) for d in ("float32", "bfloat16") for n in (512, 2048) for v in (32000, 151936)]
QUICK_GRID = [(512, 32000, "float32")]
BASELINE = "compiled-naive-kl"
TARGET = 1.1
REPEATS = 9
# The slow baselines (eager, chunked) only where they take seconds, not minutes.
SMALL_ONLY = {"naive-kl", "csd-ss-chunked"}


def run_grid(grid, providers=PROVIDERS, log=print, warmups=2, repeats=REPEATS):
    """{(provider, N, V, dtype): median ms} for every case of the grid.

    Within a case the providers take turns, one forward + backward each per round (`warmups` rounds
    untimed, the first of which compiles, then `repeats` timed), on the same inputs, in an order
    shuffled afresh each round (seeded). On a shared host the machine's speed drifts and stalls come
    and go (page faults on fresh memory cost several times more at some moments than at others, and
    single calls take 4x their median now and then): taking turns spreads the drift over all providers
    rather than onto whichever ran last, and shuffling keeps stalls that recur at some period from
    landing on the same provider every round."""
    from benchmarks import suite
    from benchmarks.providers import PROVIDERS as ALL
    from benchmarks.providers import topk_size

    times = {}
    built = {}
    for n, vocab, dtype in grid:
        names = [p for p in providers if not (p in SMALL_ONLY and n * vocab > 512 * 32000)]
        inputs = {}  # the dense providers share one (student, teacher); a top-k provider its own cache
        for name in names:
            built.setdefault(name, ALL[name].make())
            key = topk_size(name)
            if key not in inputs:
                inputs[key] = suite._inputs(suite.Case(name, n, vocab, dtype), torch.device("cpu"))
        samples = {name: [] for name in names}
        order = random.Random(0)
        for round_ in range(warmups + repeats):
            for name in order.sample(names, len(names)):
                args, leaves = inputs[topk_size(name)]
                start = time.perf_counter()
                built[name](*args).backward()
                elapsed = (time.perf_counter() - start) * 1e3
                for leaf in leaves:
                    leaf.grad = None
                if round_ >= warmups:
                    samples[name].append(elapsed)
        for name in names:
            ms = times[name, n, vocab, dtype] = statistics.median(samples[name])
            base = times.get((BASELINE, n, vocab, dtype))
            log(f"{name:20s} N={n:<5d} V={vocab:<7d} {dtype:9s} {ms:9.1f} ms"
                + (f"  {ms / base:.2f}x compiled naive KL" if base else ""))
        del inputs
    return times


_FIRST_CALL = """
import json, sys, time, torch
from benchmarks.providers import PROVIDERS
fn = PROVIDERS[sys.argv[1]].make()
out = []
for _ in range(2):
    s = torch.randn(256, 8192, requires_grad=True)
    t = torch.randn(256, 8192)
    start = time.perf_counter()
    fn(s, t).backward()
    out.append(time.perf_counter() - start)
print(json.dumps(out))
"""


def first_calls(providers, log=print):
    """{provider: (first call s with empty Inductor and extension caches, first call s in a second
    process that finds the first one's caches, second call s)} at N = 256, V = 8192 fp32: what the one-off
    compilation costs a user, on a machine's first run and on later runs."""
    result = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in providers:
        with tempfile.TemporaryDirectory() as cache:
            # Both caches empty: Inductor's and torch's extension cache, where the CPU backend's C++ row
            # passes are built once per machine.
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCH_EXTENSIONS_DIR=cache, PYTHONPATH=root)
            runs = [json.loads(subprocess.run([sys.executable, "-c", _FIRST_CALL, name], capture_output=True,
                                              text=True, env=env, cwd=root, check=True).stdout.strip().splitlines()[-1])
                    for _ in range(2)]
        result[name] = (runs[0][0], runs[1][0], runs[1][1])
        log(f"{name:20s} first call {runs[0][0]:.1f} s (empty Inductor cache), {runs[1][0]:.1f} s (cached), "
            f"then {runs[1][1] * 1e3:.0f} ms")
    return result


def huge_page_grid(grid, providers=PROVIDERS, log=print):
    """run_grid on `grid` in a fresh process with THP_MEM_ALLOC_ENABLE=1, where torch's CPU allocator puts
    every buffer of 2 MB or more on transparent huge pages, the baseline's temporaries too (our loss's
    gradient is on them either way, inductor_backend.py): the comparison with page faults equally cheap
    on both sides. The variable is read once per process, hence the subprocess."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1", PYTHONPATH=root)
        subprocess.run([sys.executable, "-m", "benchmarks.cpu_target", "--times-json", path,
                        "--grid-json", json.dumps(grid), "--providers", ",".join(providers)], env=env, cwd=root, check=True)
        rows = json.load(open(path))
    times = {tuple(key): ms for key, ms in rows}
    for (name, n, vocab, dtype), ms in times.items():
        log(f"{name:20s} N={n:<5d} V={vocab:<7d} {dtype:9s} {ms:9.1f} ms with every buffer on huge pages")
    return times


def write_csv(path, times, calls, huge_times=None):
    from benchmarks.suite import _git_commit

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    commit = _git_commit()
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["provider", "N", "V", "dtype", "metric", "value", "device", "torch", "commit"])
        device = f"CPU {os.uname().machine} x{torch.get_num_threads()}"
        for (name, n, vocab, dtype), ms in sorted(times.items()):
            out.writerow([name, n, vocab, dtype, "time_ms", f"{ms:.3f}", device, torch.__version__, commit])
            base = times.get((BASELINE, n, vocab, dtype))
            if base:
                out.writerow([name, n, vocab, dtype, "ratio", f"{ms / base:.4f}", device, torch.__version__, commit])
        for (name, n, vocab, dtype), ms in sorted((huge_times or {}).items()):
            out.writerow([name, n, vocab, dtype, "time_ms_thp", f"{ms:.3f}", device, torch.__version__, commit])
            base = huge_times.get((BASELINE, n, vocab, dtype))
            if base:
                out.writerow([name, n, vocab, dtype, "ratio_thp", f"{ms / base:.4f}", device, torch.__version__,
                              commit])
        for name, values in sorted(calls.items()):
            for metric, value in zip(("first_call_s", "cached_first_call_s", "warm_call_s"), values):
                out.writerow([name, 256, 8192, "float32", metric, f"{value:.4f}", device, torch.__version__, commit])
    return path


def _table(rows, suffix=""):
    """The markdown table of the time_ms{suffix} and ratio{suffix} rows: one line per provider."""
    def values(metric):
        return {(r["provider"], int(r["N"]), int(r["V"]), r["dtype"]): float(r["value"])
                for r in rows if r["metric"] == metric + suffix}

    ratio, ms = values("ratio"), values("time_ms")
    shapes = sorted({k[1:] for k in ms}, key=lambda k: (k[2] != "float32", k[0], k[1]))
    providers = [p for p in PROVIDERS if any(k[0] == p for k in ms)]
    lines = ["| provider | " + " | ".join(f"{d} N={n} V={v}" for n, v, d in shapes) + " |",
             "|" + " --- |" * (len(shapes) + 1)]
    for p in providers:
        cells = []
        for shape in shapes:
            key = (p,) + shape
            cells.append(f"{ms[key]:.0f} ({ratio[key]:.2f})" if key in ms else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def markdown(path) -> str:
    rows = list(csv.DictReader(open(path)))
    lines = [f"Forward + backward on {rows[0]['device']} (torch {rows[0]['torch']}, commit {rows[0]['commit']}): "
             f"median ms, and in brackets the ratio to `{BASELINE}` measured in the same rounds (target <= "
             f"{TARGET}). Default allocator settings: our gradient is on huge pages, torch's buffers (the "
             f"naive losses' temporaries) are not.", ""] + _table(rows)
    if any(r["metric"] == "ratio_thp" for r in rows):
        lines += ["", "The same in a second process with `THP_MEM_ALLOC_ENABLE=1`, which puts every torch buffer "
                  "of 2 MB or more on huge pages too, so that page faults are as cheap for the baseline:", ""]
        lines += _table(rows, "_thp")
    calls = {}
    for r in rows:
        if r["metric"].endswith("call_s"):
            calls.setdefault(r["provider"], {})[r["metric"]] = float(r["value"])
    if calls:
        lines += ["", "One-off compilation, first forward + backward at N = 256, V = 8192 fp32 in a fresh process: "
                  "with empty Inductor and C++-extension caches (a machine's first run, which builds the CPU "
                  "backend's row passes) / with the caches the first process left (later runs); then the "
                  "second call: "
                  + "; ".join(f"`{p}` {c['first_call_s']:.1f} s / {c['cached_first_call_s']:.1f} s, then "
                              f"{c['warm_call_s'] * 1e3:.0f} ms" for p, c in calls.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    parser.add_argument("--readme", action="store_true", help="also write the table into README.md")
    parser.add_argument("--times-json", help=argparse.SUPPRESS)  # huge_page_grid's child: times only
    parser.add_argument("--grid-json", help=argparse.SUPPRESS)
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.times_json:
        times = run_grid([tuple(case) for case in json.loads(args.grid_json)], tuple(args.providers.split(",")))
        json.dump([[list(key), ms] for key, ms in times.items()], open(args.times_json, "w"))
        return
    grid = QUICK_GRID if args.quick else GRID
    times = run_grid(grid)
    # The long rows, where the page faults of fresh N x V buffers weigh most.
    huge_times = huge_page_grid([case for case in grid if case[1] == max(v for _, v, _ in grid)])
    calls = first_calls(("csd-ss", "csd-ts", "kl-forward", BASELINE))
    path = write_csv(os.path.join(args.out, "cpu_target.csv"), times, calls, huge_times)
    print("wrote", path)
    if args.readme:
        from .plots import write_between_markers

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        write_between_markers(os.path.join(root, "README.md"), "cpu-target", markdown(path))
        print("updated README.md")


if __name__ == "__main__":
    main()
