"""The suite's providers through pytest-benchmark, on small shapes.

    pytest benchmarks --benchmark-only

Each timed call synchronises the device before returning, so GPU time is measured, not launch time.
Providers that cannot run here (GPU-only ones on a CPU, Liger-Kernel when not installed) are skipped.
"""

import pytest
import torch

from benchmarks.providers import PROVIDERS
from benchmarks.suite import Case, _inputs, _timers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(256, 8192), (1024, 32000)] if DEVICE.type == "cuda" else [(64, 4096)]
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"


def _synchronised(fn):
    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_provider(benchmark, name, shape, mode):
    provider = PROVIDERS[name]
    reason = provider.unavailable_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    case = Case(name, shape[0], shape[1], DTYPE)
    inputs, _ = _inputs(case, DEVICE)
    timers = _timers(provider.make(), inputs)
    benchmark.group = f"{mode} N={shape[0]} V={shape[1]} {DTYPE}"
    benchmark(_synchronised(timers[mode]))
