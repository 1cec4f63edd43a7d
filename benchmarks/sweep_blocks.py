"""Sweep the Triton kernels' BLOCK and num_warps on a GPU, for the block-size heuristic.

    python -m benchmarks.sweep_blocks                      # writes benchmarks/results/<gpu>/block_sweep.csv
    python -m benchmarks.sweep_blocks --dry-run            # lists the grid (runs anywhere)

For every shape (N in {256, 8192} x V in {32000, 151936, 256000}, bf16) and weighting ("ss", "ts"),
the two passes are swept over their own parameters and timed separately with triton.testing.do_bench:
the backward over (BLOCK, num_warps), overriding `triton_backend.block_config`; the forward over
(num_warps, tile rows per block), overriding `FORWARD_WARPS` and `FORWARD_SUB` (its BLOCK follows, see
`forward_config`). The copy bandwidth of the same GPU is measured in the same run, and each row carries
the fraction of it achieved under the bytes model (forward 4 B/element, backward 6 B/element in bf16).
The winners go into `block_config` and `forward_config`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import re

import torch

ROWS = (256, 8192)
VOCABS = (32000, 151936, 256000)
BLOCKS = (1024, 2048, 4096, 8192)
WARPS = (4, 8, 16)
FORWARD_WARPS = (1, 2, 4, 8)
FORWARD_SUBS = (1, 2, 4)
WEIGHTINGS = ("ss", "ts")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    grid = list(itertools.product(ROWS, VOCABS, WEIGHTINGS, BLOCKS, WARPS))
    forward_grid = list(itertools.product(ROWS, VOCABS, WEIGHTINGS, FORWARD_WARPS, FORWARD_SUBS))
    if args.dry_run or not torch.cuda.is_available():
        print(f"{len(grid)} backward configurations: N {ROWS} x V {VOCABS} x weighting {WEIGHTINGS} x BLOCK "
              f"{BLOCKS} x num_warps {WARPS}; {len(forward_grid)} forward configurations: num_warps "
              f"{FORWARD_WARPS} x tile rows {FORWARD_SUBS}")
        if not args.dry_run:
            print("no GPU: nothing measured")
        return

    from triton.testing import do_bench

    from csd_kernels.contract import LossSpec, parse_weighting
    from csd_kernels.kernels import triton_backend as tb

    from .suite import ROOT, copy_bandwidth, device_name

    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", slug, "block_sweep.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    original = tb.block_config, tb.FORWARD_WARPS, tb.FORWARD_SUB
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["N", "V", "weighting", "BLOCK", "num_warps", "pass", "ms_p50", "fraction_of_copy",
                         "device", "copy_bytes_per_s"])

        def record(pass_, n, vocab, weighting, block, warps, ms):
            moved = (4 if pass_ == "forward" else 6) * n * vocab
            writer.writerow([n, vocab, weighting, block, warps, pass_, f"{ms:.5f}",
                             f"{moved / (ms * 1e-3) / copy_bw:.4f}", name, f"{copy_bw:.4g}"])
            f.flush()
            print(f"N={n} V={vocab} {weighting} {pass_} BLOCK={block} warps={warps}: {ms:.3f} ms")

        for n, vocab in itertools.product(ROWS, VOCABS):
            student = torch.randn(n, vocab, device=device, dtype=torch.bfloat16)
            teacher = torch.randn(n, vocab, device=device, dtype=torch.bfloat16)
            active = torch.ones(n, dtype=torch.bool, device=device)
            grad_rows = torch.full((1,), 1.0 / n, device=device).expand(n)
            grad = torch.empty_like(student)
            for weighting in WEIGHTINGS:
                # The launchers themselves, without the public function's few small torch ops, which
                # would dominate at N = 256.
                spec = LossSpec(*parse_weighting(weighting), 1.0, 1.0)
                _, _, stats = tb.forward(student, teacher, active, None, spec)
                for warps, sub in itertools.product(FORWARD_WARPS, FORWARD_SUBS):
                    tb.FORWARD_WARPS, tb.FORWARD_SUB = warps, sub
                    try:
                        ms = do_bench(lambda: tb.forward(student, teacher, active, None, spec))
                        block = tb.forward_config(vocab, student.element_size())[0]
                    finally:
                        _, tb.FORWARD_WARPS, tb.FORWARD_SUB = original
                    record("forward", n, vocab, weighting, block, warps, ms)
                for block, warps in itertools.product(BLOCKS, WARPS):
                    tb.block_config = lambda v, b=block, w=warps: (
                        min(b, max(16, 1 << (max(v, 1) - 1).bit_length())), w)
                    try:
                        ms = do_bench(lambda: tb.backward(student, teacher, active, None, stats, grad_rows, spec,
                                                          out=grad))
                    finally:
                        tb.block_config = original[0]
                    record("backward", n, vocab, weighting, block, warps, ms)
            del student, teacher, grad
            torch.cuda.empty_cache()
    print("wrote", out)


if __name__ == "__main__":
    main()
