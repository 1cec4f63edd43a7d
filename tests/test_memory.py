"""The CPU backends hold no N x V temporary: extra memory is the gradient plus O(N * chunk) (chunked) or
O(N) (compiled)."""

import sys

import pytest

from benchmarks.cpu_memory import measure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["csd-ss", "csd-ss-chunked"], ids=["compiled", "chunked"])
def test_cpu_backends_extra_memory_is_about_the_gradient(provider):
    """Both CPU backends: "auto" at this size runs the compiled one (issue 17), csd-ss-chunked forces
    the chunked one; neither holds an N x V temporary besides the gradient."""
    rows, vocab = 1024, 32000  # a 131 MB fp32 gradient; (N * chunk) temporaries are a few MB here
    lean = measure(provider, rows, vocab)
    ratio = lean["extra_bytes"] / lean["grad_bytes"]
    assert ratio < 1.5, f"{provider} used {ratio:.2f}x its gradient in extra memory: {lean}"
    # and the gradient itself is counted (not a mapping a previous call left behind)
    assert lean["extra_bytes"] >= lean["grad_bytes"], lean


@pytest.mark.slow
def test_the_memory_measurement_can_tell():
    """A naive implementation needs several N x V tensors, and the measurement shows it."""
    naive = measure("authors-csd", 1024, 32000)
    assert naive["extra_bytes"] > 3 * naive["grad_bytes"], naive


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["topk8-csd-ss", "topk64-kl-forward"])  # K only changes O(N K) memory
def test_topk_extra_memory_is_about_the_gradient(provider):
    """No (N, V) temporary besides the gradient, and no teacher logits at all (issue 15)."""
    rows, vocab = 1024, 32000
    result = measure(provider, rows, vocab)
    ratio = result["extra_bytes"] / result["grad_bytes"]
    assert 1.0 <= ratio < 1.25, f"{provider} used {ratio:.2f}x its gradient in extra memory: {result}"


def test_topk_benchmark_rows_on_cpu(tmp_path):
    """The top-k providers run through the suite on CPU: time rows for every mode, no errors."""
    import csv

    import torch

    from benchmarks import suite

    cases = [suite.Case(p, 16, 512, "float32") for p in ("topk8-csd-ss", "topk64-csd-ss-notail", "topk64-kl-forward")]
    path = suite.run(cases, str(tmp_path / "results.csv"), torch.device("cpu"), repeats=2, log=lambda *a: None)
    rows = list(csv.DictReader(open(path)))
    times = [(r["provider"], r["mode"]) for r in rows if r["metric"] == "time" and r["status"] == "ok"]
    assert sorted(times) == sorted((c.provider, m) for c in cases for m in ("forward", "backward", "full")), rows
    assert suite.bytes_per_element("bfloat16", "full", "topk8-csd-ss") == 6  # against dense CSD's 10
    assert suite.bytes_per_element("bfloat16", "full", "csd-ss") == 10


@pytest.mark.slow
def test_fused_linear_trainer_uses_less_memory():
    """CSDTrainer(fused_linear=True) at a shape where the logits dominate (issue 16; README numbers come
    from benchmarks.trainer_memory at a larger batch)."""
    pytest.importorskip("transformers")
    from benchmarks.trainer_memory import measure

    shape = dict(vocab=32000, batch=2, seq=256, width=64)
    logits_path, fused = measure(False, shape), measure(True, shape)
    # Here one chunk of fp32 logits (the CPU budget, 64 MiB) is a large part of the fused path's memory.
    assert fused["extra_bytes"] < 0.8 * logits_path["extra_bytes"], (logits_path, fused)
    assert abs(fused["loss"] - logits_path["loss"]) <= 1e-4 * abs(logits_path["loss"])
