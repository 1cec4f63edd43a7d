"""Custom operators: opcheck, torch.compile without graph breaks, and no host synchronisation."""

import contextlib

import pytest
import torch

from csd_kernels import csd_loss, kl_loss
from csd_kernels.ops import distill_rows, distill_rows_backward
from helpers import DEVICE, assert_close
from test_csd_loss import make_logits

SPEC_ARGS = ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 1.5, 0.7, 0, 1.0, 0.5)  # "st" weighting, CE weight 0.5


def op_args(backend, components=True):
    student, teacher = make_logits(lead=(5,))
    active = torch.tensor([True, True, False, True, True], device=DEVICE)
    labels = torch.randint(0, 301, (5,), device=DEVICE)
    return (student.requires_grad_(True), teacher, active, labels, *SPEC_ARGS, backend, components, False)


def test_opcheck_forward_op(backend):
    torch.library.opcheck(distill_rows, op_args(backend))


def test_opcheck_backward_op(backend):
    args = op_args(backend)
    _, _, stats = distill_rows(*args)
    student, teacher, active, labels = args[:4]
    grad_rows = torch.randn(5, device=DEVICE)
    torch.library.opcheck(distill_rows_backward, (student.detach(), teacher, active, labels, stats.detach(),
                                                  grad_rows, *SPEC_ARGS, backend))


class TinyStudent(torch.nn.Module):
    def __init__(self, hidden=16, vocab=301):
        super().__init__()
        self.body = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def forward_loss(model, x, teacher, labels, backend):
    """The compiled region of a training step (Dynamo does not trace .backward(); AOTAutograd compiles
    the backward graph of this region, which runs the backward operator)."""
    logits = model(x)
    return csd_loss(logits[:, :-1], teacher[:, :-1], labels=labels[:, 1:], weighting="ts", backend=backend,
                    ce_weight=0.1) + 0.5 * kl_loss(logits, teacher, backend=backend)


def train_step(loss_fn, model, x, teacher, labels, backend):
    loss = loss_fn(model, x, teacher, labels, backend)
    loss.backward()
    return loss.detach()


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_training_step_matches_eager_without_graph_breaks(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = TinyStudent().to(DEVICE)
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd runs the ops' fake and autograd paths
    compiled = torch.compile(forward_loss, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for seq in (6, 9, 13):  # a new sequence length must not recompile
        x = torch.randn(2, seq, 16, device=DEVICE)
        teacher = torch.randn(2, seq, 305, device=DEVICE)
        labels = torch.randint(0, 301, (2, seq), device=DEVICE)
        labels[0, 2] = -100
        model.zero_grad()
        eager_loss = train_step(forward_loss, model, x, teacher, labels, backend)
        eager_grads = _grads(model)
        model.zero_grad()
        compiled_loss = train_step(compiled, model, x, teacher, labels, backend)
        assert_close(compiled_loss, eager_loss, name="compiled loss")
        for got, want in zip(_grads(model), eager_grads):
            assert_close(got, want, name="compiled gradient")
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[-1] == frames[0], f"graphs compiled after each length: {frames}"


@pytest.mark.slow
def test_inductor_compiles_the_loss():
    """The default compiler (Inductor) around the opaque operator, fullgraph, torch backend."""
    torch._dynamo.reset()
    student, teacher = make_logits(lead=(4,))

    def step(s, t):
        s = s * 1.0
        return csd_loss(torch.tanh(s) * 3.0, t, weighting="us", backend="torch")

    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    eager = step(s1, teacher)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(s2, teacher)
    compiled.backward()
    assert_close(compiled, eager, name="inductor loss")
    assert_close(s2.grad, s1.grad, name="inductor gradient")


@contextlib.contextmanager
def forbid_host_sync(monkeypatch):
    """Make every way Python code can pull a tensor's value to the host raise."""
    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called on the hot path")
        return fail

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_host_sync_on_the_hot_path(backend, monkeypatch, reduction):
    student, teacher = make_logits(lead=(2, 3))
    student.requires_grad_(True)
    labels = torch.randint(0, 301, (2, 3), device=DEVICE)
    labels[1, 1] = -100
    num_items = torch.tensor(4, device=DEVICE)
    upstream = torch.ones(2, 3, device=DEVICE) if reduction == "none" else None
    with forbid_host_sync(monkeypatch):
        loss = csd_loss(student, teacher, labels=labels, weighting=({"student": 0.5, "uniform": 0.5}, "teacher"),
                        ce_weight=0.2, reduction=reduction, num_items_in_batch=num_items, backend=backend)
        loss.backward(upstream)
        kl = kl_loss(student, teacher, labels=labels, kind="reverse", reduction=reduction, backend=backend)
        kl.backward(upstream)


def test_host_sync_guard_can_fail(monkeypatch):
    with forbid_host_sync(monkeypatch), pytest.raises(AssertionError, match="host synchronisation"):
        torch.ones(1).item()


@pytest.mark.gpu
def test_gpu_no_sync_and_cuda_graph_replay():
    student, teacher = make_logits(lead=(64,), vocab=32000, dtype=torch.bfloat16)
    student.requires_grad_(True)
    labels = torch.randint(0, 32000, (64,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = csd_loss(student, teacher, labels=labels, ce_weight=0.5, backend="triton")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_loss, eager_grad = loss.detach().clone(), student.grad.clone()

    static_student = student.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel compilation) outside the capture
        csd_loss(static_student, teacher, labels=labels, ce_weight=0.5, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = csd_loss(static_student, teacher, labels=labels, ce_weight=0.5, backend="triton")
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_loss, eager_loss) and torch.equal(static_student.grad, eager_grad)


@pytest.mark.gpu
def test_gpu_new_sequence_length_does_not_recompile_kernels():
    """N is a runtime argument: Triton may specialise it on divisibility by 16, nothing more."""
    from csd_kernels.kernels import triton_backend as tb

    for n in (100, 200, 300, 400, 1000, 1003):
        s, t = make_logits(lead=(n,), vocab=32000, dtype=torch.bfloat16)
        csd_loss(s.requires_grad_(True), t, backend="triton").backward()
    for kernel in (tb._fwd_raw_kernel, tb._fwd_kernel):  # the raw pass and the exact pass it may call
        caches = getattr(kernel, "device_caches", None)
        if not caches:
            pytest.skip("this Triton version keeps its kernel cache elsewhere")
        entries = sum(len(cache[0]) for cache in caches.values())
        assert entries <= 4, f"{entries} compiled {kernel.fn.__name__} kernels for 6 sequence lengths"
