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


def _patch_the_interpreter_once_per_launch():
    """Triton's interpreter re-patches triton.language on every call of a jit function inside a kernel
    (`_patch_lang`, about 0.3 ms: every tl.sum and tl.max is such a call), which is most of the time of
    the interpreter tests. Within one launch the modules are already patched, so a repeated patch of
    the same modules is skipped; each launch still patches (and restores) as Triton does. Only speed
    changes; where this Triton's interpreter differs, nothing is changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
        patch_lang, executor = interpreter._patch_lang, interpreter.GridExecutor
    except (ImportError, AttributeError):
        return
    import triton.language as tl

    patched = []  # the module sets patched in the current launch; empty outside launches

    def once_per_launch(fn):
        modules = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        if modules in patched:
            return None  # a device call: Triton discards what _patch_lang returns there
        scope = patch_lang(fn)
        patched.append(modules)
        return scope

    launch = executor.__call__

    def call(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.clear()

    interpreter._patch_lang = once_per_launch
    executor.__call__ = call


def _share_the_cores_between_workers():
    """Under pytest-xdist (`make test` runs `-n auto`), each worker takes its share of the cores for
    torch's intra-op threads, so that two workers on two cores do not oversubscribe them (the
    interpreter tests are single-threaded Python; the torch-heavy ones would otherwise fight)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_configure(config):
    _patch_the_interpreter_once_per_launch()
    _share_the_cores_between_workers()
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
