"""The PyTorch backend streams the vocabulary: extra memory is the gradient plus O(N * chunk)."""

import sys

import pytest

from benchmarks.cpu_memory import measure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


@pytest.mark.slow
def test_torch_backend_extra_memory_is_about_the_gradient():
    rows, vocab = 1024, 32000  # a 131 MB fp32 gradient; (N * chunk) temporaries are a few MB here
    lean = measure("csd-ss", rows, vocab)  # the PyTorch backend: no GPU here
    naive = measure("authors-csd", rows, vocab)
    ratio = lean["extra_bytes"] / lean["grad_bytes"]
    assert ratio < 1.5, f"torch backend used {ratio:.2f}x its gradient in extra memory: {lean}"
    # The measurement can tell the difference: a naive implementation needs several N x V tensors.
    assert naive["extra_bytes"] > 3 * naive["grad_bytes"], naive
