"""Test configuration: the Triton interpreter on machines without CUDA, seeds, and the `gpu` marker."""

import os
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter-or-compiler when a kernel is decorated, so this must precede any import
    # of triton (csd_kernels imports it lazily, only when a Triton kernel is first used).
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

# Inductor's on-disk caches outlive a change of our operators' output shapes (a cached graph keeps the
# shapes it was compiled for), so every test session compiles into a fresh directory of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="csd-kernels-inductor-"))

import pytest  # noqa: E402


def pytest_configure(config):
    if os.environ.get("CSD_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        pytest.exit("CSD_REQUIRE_GPU=1 (make test-gpu) but torch sees no CUDA GPU: this run would only "
                    "test the interpreter", returncode=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the Triton block (128) and the PyTorch backend's chunk (100 columns, so chunk and block
    boundaries differ) so that interpreter-sized rows (V of a few hundred) span several of each."""
    from csd_kernels.kernels import torch_backend, triton_backend

    monkeypatch.setattr(triton_backend, "MAX_BLOCK", 128)
    monkeypatch.setattr(torch_backend, "_chunk_size", lambda n_rows, vocab, device: min(vocab, 100))
    return 128


@pytest.fixture(params=["torch", "triton"])
def backend(request, small_blocks):
    return request.param


@pytest.fixture(params=[1, 3], ids=["one-program-per-row", "split-rows"])
def row_split(request, monkeypatch):
    """Force the Triton forward's programs-per-row (1: in-kernel finalize; 3: partials + merge)."""
    from csd_kernels.kernels import triton_backend

    monkeypatch.setattr(triton_backend, "split_count", lambda *args: request.param)
    return request.param
