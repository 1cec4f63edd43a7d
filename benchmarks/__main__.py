"""`make bench`: run the benchmark suite, then draw its plots and table.

    python -m benchmarks                 # the full suite on a GPU, the CPU variant otherwise
    python -m benchmarks --quick         # a few shapes only
    python -m benchmarks --providers csd-ss naive-kl --out benchmarks/results/mine

Results: benchmarks/results/<gpu|cpu>/results.csv (long format, see suite.py), time_vs_vocab.png,
memory_vs_vocab.png and table.md beside it.
"""

import argparse
import os
import re

import torch

from . import plots, suite
from .providers import PROVIDERS

GPU_ROWS = (256, 1024, 8192, 16384)
GPU_VOCABS = (32000, 50257, 128256, 151936, 256000)
GPU_DTYPES = ("bfloat16", "float32")
# The CPU variant: the PyTorch paths on small shapes, a few minutes on 2 cores.
CPU_PROVIDERS = ("csd-ss", "csd-ts", "csd-us", "kl-forward", "kl-reverse", "csd-ss+ce", "csd-ss-chunked",
                 "csd-ss+separate-ce", "authors-csd", "naive-kl", "compiled-naive-kl", "compiled-authors-csd",
                 "topk8-csd-ss", "topk64-csd-ss", "topk512-csd-ss")
CPU_ROWS = (512,)
CPU_VOCABS = (8192, 32000, 50257)
# Fused-linear shapes (hidden states in, no logits): the GPU target shape, and a small CPU one.
GPU_LINEAR = [("bfloat16", 8192, 4096, 128256)]
CPU_LINEAR = [("float32", 512, 256, 32000)]
LINEAR = ("fused-linear-csd", "linear-then-csd", "linear-only")
# The foundation issue's memory target: csd_loss(backend="torch") at (8192, 32000) fp32 on CPU.
CPU_MEMORY_TARGET = suite.Case("csd-ss", 8192, 32000, "float32")


def main(argv=None):
    parser = argparse.ArgumentParser(description="csd_kernels benchmark suite")
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<gpu|cpu>)")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        providers = args.providers or list(PROVIDERS)
        rows, vocabs, dtypes = (GPU_ROWS[::2], GPU_VOCABS[::2], GPU_DTYPES[:1]) if args.quick else (
            GPU_ROWS, GPU_VOCABS, GPU_DTYPES)
        slug = re.sub(r"[^a-z0-9]+", "-", suite.device_name(device).lower()).strip("-")
    else:
        print("no GPU: running the CPU benchmark (PyTorch backends, the naive baselines and KL on small "
              "shapes; Triton kernels need a GPU)")
        providers = args.providers or list(CPU_PROVIDERS)
        rows, vocabs, dtypes = CPU_ROWS, CPU_VOCABS[:2] if args.quick else CPU_VOCABS, ("float32",)
        slug = "cpu"
    out = args.out or os.path.join(suite.ROOT, "benchmarks", "results", slug)
    cases = [suite.Case(p, n, v, d) for d in dtypes for n in rows for v in vocabs for p in providers]
    if not args.providers and not args.quick:
        cases += [suite.Case(p, n, v, d, hidden=h) for d, n, h, v in (GPU_LINEAR if on_gpu else CPU_LINEAR)
                  for p in LINEAR]
    path = suite.run(cases, os.path.join(out, "results.csv"), device,
                     # Each CPU memory case is a fresh process (seconds): the largest N only.
                     memory_cases=[c for c in cases if c.n == max(rows)] if not on_gpu else (),
                     extra_memory_cases=() if on_gpu or args.quick else (CPU_MEMORY_TARGET,))
    for written in plots.render(path):
        print("wrote", os.path.relpath(written, suite.ROOT))
    if not on_gpu and not args.providers:
        # The CPU path's target (issue 17): ratios to torch.compile'd naive KL at the target shapes.
        from . import cpu_target

        cpu_target.main(["--out", out] + (["--quick"] if args.quick else []))


if __name__ == "__main__":
    main()
