"""Extra peak host memory of one forward + backward, measured in a fresh process (Linux only).

CPU tensors have no allocator statistics like torch.cuda.max_memory_allocated, so this measures the
process's resident set: after the inputs exist it resets the kernel's high-water mark
(/proc/self/clear_refs, "5"), runs forward and backward, and reads VmHWM. "Extra" is VmHWM minus the
resident set just before the call, so it includes the gradient (which the caller keeps) and every
temporary. glibc is told to serve every allocation above 64 KiB with mmap so that freed temporaries
leave the resident set at once and the next case cannot reuse them unseen.

Usage: python -m benchmarks.cpu_memory --provider csd-ss --rows 8192 --vocab 32000 --dtype float32
Prints one JSON object: extra_bytes, grad_bytes, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(rows, vocab, hidden, dtype, linear, topk=None):
    import torch

    from benchmarks.providers import topk_inputs

    if not linear:
        student = torch.empty(rows, vocab, dtype=dtype).normal_().requires_grad_(True)
        teacher = torch.empty(rows, vocab, dtype=dtype).normal_()
        if topk:  # the cache exists before the measurement, like the logits
            return topk_inputs(student, teacher, min(topk, vocab)), [student]
        return (student, teacher), [student]
    h = torch.empty(rows, hidden, dtype=dtype).normal_().requires_grad_(True)
    w = (torch.empty(vocab, hidden, dtype=dtype).normal_() * hidden**-0.5).requires_grad_(True)
    return (h, w, torch.empty(rows, vocab, dtype=dtype).normal_()), [h, w]


def _measure(provider: str, rows: int, vocab: int, dtype_name: str, hidden: int = 0) -> dict:
    import torch

    from benchmarks.providers import LINEAR_PROVIDERS, PROVIDERS, topk_size

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    linear = provider in LINEAR_PROVIDERS
    fn = LINEAR_PROVIDERS[provider] if linear else PROVIDERS[provider].make()
    # Warm up on a tiny input first: lazy imports, autograd's worker threads and the thread pools
    # allocate once per process, and that is not the loss's memory.
    k = topk_size(provider)
    tiny, _ = _inputs(2, 64, 8, dtype, linear, k)
    fn(*tiny).backward()
    inputs, leaves = _inputs(rows, vocab, hidden, dtype, linear, k)
    # One call on the measured inputs too: torch.compile (the compiled baselines, and the CPU's compiled
    # backend, which "auto" picks from a size up) compiles there, and the compiler's own memory is not
    # the loss's.
    fn(*inputs).backward()
    for leaf in leaves:
        leaf.grad = None
    # The CPU backward keeps the gradient it just freed for its next call (csd_kernels.empty_cache): the
    # measured call maps its own, as a process's first step does, so that its memory counts.
    import csd_kernels

    csd_kernels.empty_cache()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _resident_bytes("VmRSS")
    start = time.perf_counter()
    fn(*inputs).backward()
    seconds = time.perf_counter() - start
    peak = _resident_bytes("VmHWM")
    grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in leaves)
    return {"extra_bytes": peak - before, "grad_bytes": grad_bytes, "seconds": seconds}


def measure(provider: str, rows: int, vocab: int, dtype: str = "float32", hidden: int = 0) -> dict:
    """Run `_measure` in a fresh interpreter (clean allocator state) and return its result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "benchmarks.cpu_memory", "--provider", provider, "--rows", str(rows),
           "--vocab", str(vocab), "--dtype", dtype, "--hidden", str(hidden)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", required=True, help="a name from benchmarks/providers.py")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=0, help="H, for the fused-linear providers")
    args = parser.parse_args()
    print(json.dumps(_measure(args.provider, args.rows, args.vocab, args.dtype, args.hidden)))
