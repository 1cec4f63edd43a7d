"""The benchmark harness: providers x modes x shapes x dtypes, written to one long-format CSV.

Each row of the CSV is one metric of one case: provider, mode (forward, backward, full = forward +
backward), metric, N, V, dtype, the 20th/50th/80th percentiles, unit and status, stamped with the
device, versions, git commit and time. Rows are appended and flushed as they are measured, so an
interrupted run keeps what it measured.

GPU metrics: time (triton.testing.do_bench quantiles), extra peak memory (max_memory_allocated over the
inputs, one forward + backward), bandwidth as a fraction of this GPU's measured copy bandwidth under the
model of bytes every implementation must move (forward reads s and t; backward reads them again and
writes the gradient: 10 bytes per element in bf16), and tokens (rows) per second.
CPU metrics: time (perf_counter over a few repetitions) and extra peak resident memory of one forward +
backward in a fresh process (benchmarks/cpu_memory.py).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

import csd_kernels

from .providers import LINEAR_PROVIDERS, PROVIDERS, Provider, topk_inputs, topk_size

MODES = ("forward", "backward", "full")
COLUMNS = ["provider", "mode", "metric", "N", "V", "H", "dtype", "p20", "p50", "p80", "unit", "status",
           "device", "torch", "triton", "csd_kernels", "commit", "timestamp"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Case:
    provider: str
    n: int
    vocab: int
    dtype: str
    hidden: int = 0  # H, for the fused-linear providers (inputs are hidden states and a weight)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


class CsvWriter:
    def __init__(self, path: str, device: torch.device):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.stamp = {
            "device": device_name(device), "torch": torch.__version__, "triton": _triton_version(),
            "csd_kernels": csd_kernels.__version__, "commit": _git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()

    def row(self, case: Case, mode: str, metric: str, values, unit: str, status: str = "ok"):
        p20, p50, p80 = values if values is not None else ("", "", "")
        self._writer.writerow({
            "provider": case.provider, "mode": mode, "metric": metric, "N": case.n, "V": case.vocab,
            "H": case.hidden or "", "dtype": case.dtype, "p20": p20, "p50": p50, "p80": p80, "unit": unit, "status": status,
            **self.stamp,
        })
        self._file.flush()

    def close(self):
        self._file.close()


def _inputs(case: Case, device: torch.device):
    """(inputs, leaves): the loss's arguments and those that get a gradient."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    if case.hidden:
        hidden = torch.randn(case.n, case.hidden, device=device, dtype=dtype, generator=gen)
        weight = (torch.randn(case.vocab, case.hidden, device=device, generator=gen) * case.hidden**-0.5).to(dtype)
        teacher = torch.randn(case.n, case.vocab, device=device, dtype=dtype, generator=gen)
        leaves = [hidden.requires_grad_(True), weight.requires_grad_(True)]
        return (hidden, weight, teacher), leaves
    student = torch.randn(case.n, case.vocab, device=device, dtype=dtype, generator=gen)
    teacher = (student.float() + torch.randn(case.n, case.vocab, device=device, generator=gen)).to(dtype)
    k = topk_size(case.provider)
    if k:  # the teacher's cache is built here, outside every timing and memory measurement
        return topk_inputs(student.requires_grad_(True), teacher, k), [student]
    return (student.requires_grad_(True), teacher), [student]


def bytes_per_element(dtype: str, mode: str, provider: str = "") -> int:
    """The traffic floor: forward reads s and t, backward reads both and writes the gradient. A top-k
    provider has no dense teacher: s forward, s and the gradient backward (its O(K) cache aside)."""
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if topk_size(provider):
        return {"forward": 1, "backward": 2, "full": 3}[mode] * size
    return {"forward": 2, "backward": 3, "full": 5}[mode] * size


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write), measured now."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.uint8, device=device)  # 512 MiB, far beyond L2
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() / (ms * 1e-3)


def _timers(fn, inputs):
    """The three timed callables of a case; backward reruns a prepared graph."""
    def forward():
        with torch.enable_grad():
            return fn(*inputs)

    def full():
        fn(*inputs).backward()

    loss = forward()

    def backward():
        loss.backward(retain_graph=True)

    return {"forward": forward, "backward": backward, "full": full}


def _gpu_case(case: Case, fn, writer: CsvWriter, copy_bw: float):
    from triton.testing import do_bench

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    inputs, leaves = _inputs(case, device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*inputs).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    writer.row(case, "full", "extra_memory", (extra,) * 3, "bytes")
    timers = _timers(fn, inputs)
    for mode in MODES:
        p20, p50, p80 = do_bench(timers[mode], quantiles=[0.2, 0.5, 0.8], grad_to_none=leaves)
        writer.row(case, mode, "time", (p20, p50, p80), "ms")
        if case.hidden:
            continue  # GEMM-bound: compared with the GEMM-only provider, not with bandwidth
        moved = bytes_per_element(case.dtype, mode, case.provider) * case.n * case.vocab
        writer.row(case, mode, "bandwidth_fraction", tuple(moved / (ms * 1e-3) / copy_bw for ms in (p80, p50, p20)), "of copy")
        writer.row(case, mode, "tokens_per_s", tuple(case.n / (ms * 1e-3) for ms in (p80, p50, p20)), "rows/s")


def _cpu_case(case: Case, fn, writer: CsvWriter, repeats: int):
    inputs, leaves = _inputs(case, torch.device("cpu"))
    timers = _timers(fn, inputs)
    for mode in MODES:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            timers[mode]()
            samples.append((time.perf_counter() - start) * 1e3)
            for leaf in leaves:
                leaf.grad = None
        q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
        writer.row(case, mode, "time", (q[0], statistics.median(samples), q[3]), "ms")
        writer.row(case, mode, "tokens_per_s", (case.n / (q[3] * 1e-3), case.n / (statistics.median(samples) * 1e-3), case.n / (q[0] * 1e-3)), "rows/s")


def cpu_memory_case(case: Case, writer: CsvWriter):
    from .cpu_memory import measure

    result = measure(case.provider, case.n, case.vocab, case.dtype, case.hidden)
    writer.row(case, "full", "extra_memory", (result["extra_bytes"],) * 3, "bytes")
    writer.row(case, "full", "extra_memory_over_grad", (result["extra_bytes"] / result["grad_bytes"],) * 3, "ratio")


def _provider(name: str) -> Provider:
    if name in LINEAR_PROVIDERS:
        return Provider(name, name, lambda: LINEAR_PROVIDERS[name])
    return PROVIDERS[name]


def run(cases: Iterable[Case], path: str, device: torch.device, repeats: int = 3, log=print,
        memory_cases: Iterable[Case] = (), extra_memory_cases: Iterable[Case] = ()) -> str:
    """Measure `cases`; on CPU also the extra memory of `memory_cases` (and of `extra_memory_cases`,
    which are memory-only) in fresh processes. Returns the CSV path."""
    writer = CsvWriter(path, device)
    copy_bw: Optional[float] = None
    if device.type == "cuda":
        copy_bw = copy_bandwidth(device)
        log(f"copy bandwidth of {device_name(device)}: {copy_bw / 1e12:.2f} TB/s")
        writer.row(Case("copy", 0, 0, "uint8"), "full", "copy_bandwidth", (copy_bw,) * 3, "bytes/s")
    cases: List[Case] = list(cases)
    built = {}
    for i, case in enumerate(cases, 1):
        provider = _provider(case.provider)
        label = f"[{i}/{len(cases)}] {case.provider:22s} N={case.n:<6d} V={case.vocab:<7d} {case.dtype}"
        if case.hidden:
            label += f" H={case.hidden}"
        reason = provider.unavailable_reason(device)
        if reason:
            log(f"{label}  skipped: {reason}")
            writer.row(case, "full", "time", None, "ms", status=f"skipped: {reason}")
            continue
        start = time.perf_counter()
        try:
            fn = built.setdefault(case.provider, provider.make())
            if device.type == "cuda":
                _gpu_case(case, fn, writer, copy_bw)
            else:
                _cpu_case(case, fn, writer, repeats)
            status = "ok"
        except torch.cuda.OutOfMemoryError:
            status = "out of memory"
            writer.row(case, "full", "time", None, "ms", status=status)
        except Exception as error:  # one broken provider (a compiler failure, say) must not end the run
            status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            writer.row(case, "full", "time", None, "ms", status=status)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"{label}  {status} ({time.perf_counter() - start:.1f} s)")
    memory_cases = [c for c in memory_cases if not _provider(c.provider).unavailable_reason(device)]
    for i, case in enumerate(list(memory_cases) + list(extra_memory_cases), 1):
        start = time.perf_counter()
        cpu_memory_case(case, writer)
        log(f"[memory {i}] {case.provider:22s} N={case.n:<6d} V={case.vocab:<7d} {case.dtype}  "
            f"({time.perf_counter() - start:.1f} s)")
    writer.close()
    return path
