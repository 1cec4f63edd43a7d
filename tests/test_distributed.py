"""Vocabulary-parallel losses across 2 and 3 processes (gloo on CPU, file rendezvous) vs one process."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from csd_kernels import csd_loss, kl_loss
from csd_kernels.distributed import vocab_parallel_csd_loss, vocab_parallel_kl_loss

WEIGHTINGS = ["ss", "ts", "us", "tt", "uu", ({"teacher": 0.15, "student": 0.85},) * 2]
VOCAB = 301  # uneven shards: 151/150 on 2 ranks, 101/100/100 on 3


def _shard_bounds(vocab, world, rank):
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = 2.0 * torch.randn(3, 4, VOCAB, generator=g)
    teacher = student + torch.randn(3, 4, VOCAB, generator=g)
    student[0, 0, :60] = -float("inf")  # a masked block that spans the first shard only
    teacher[1, 2, 140:170] = -float("inf")  # one that spans a shard boundary
    student[2, 1, 1] += 1e3  # a large outlier in one row
    teacher[2, 3, :160] = -float("inf")  # a row whose first shard is all -inf (on 2 ranks)
    student[1, 1] = teacher[1, 1] + 1e3 + 0.1 * torch.randn(VOCAB, generator=g)  # d with a large offset
    labels = torch.randint(0, VOCAB, (3, 4), generator=g)
    labels[0, 3] = labels[2, 0] = -100
    return student, teacher, labels


def _close(a, b, what):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    assert err <= 2e-5 * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _worker(rank, world, init_file, backend, cases):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher, labels = _inputs()
        start, stop = _shard_bounds(VOCAB, world, rank)
        for name, kwargs in cases:
            if "strided" in name:  # per-row tensors as non-contiguous views
                kwargs = {k: v.t().contiguous().t() if k in ("labels", "mask") else v for k, v in kwargs.items()}
            kl = name.startswith("kl")
            full_fn, shard_fn = (kl_loss, vocab_parallel_kl_loss) if kl else (csd_loss, vocab_parallel_csd_loss)
            full = student.clone().requires_grad_(True)
            expected = full_fn(full, teacher, backend="torch", **kwargs)
            upstream = torch.linspace(0.5, 1.5, expected.numel()).view(expected.shape)
            expected.backward(upstream)
            shard = student[..., start:stop].clone().requires_grad_(True)
            got = shard_fn(shard, teacher[..., start:stop].contiguous(), backend=backend, **kwargs)
            got.backward(upstream)
            _close(got.detach(), expected.detach(), f"rank {rank} {name} loss")
            _close(shard.grad, full.grad[..., start:stop], f"rank {rank} {name} gradient")
    finally:
        dist.destroy_process_group()


def _run(world, backend, cases):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous"), backend, cases), nprocs=world, join=True)


def _cases():
    _, _, labels = _inputs()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    return (
        [(f"csd-{i}", dict(weighting=w, temperature=1.5, labels=labels)) for i, w in enumerate(WEIGHTINGS)]
        + [("csd-mask-sum", dict(weighting="ts", reduction="sum", mask=mask)),
           ("csd-none-num-items", dict(weighting="us", reduction="none", num_items_in_batch=5)),
           ("csd-num-items", dict(weighting="st", labels=labels, num_items_in_batch=7)),
           ("csd-ce", dict(weighting="ts", labels=labels, ce_weight=0.7, csd_weight=0.5)),
           ("csd-ce-none", dict(weighting="ss", labels=labels, ce_weight=1.0, reduction="none",
                                temperature=2.0)),
           ("csd-ce-strided-int16", dict(weighting="uu", labels=labels.to(torch.int16), mask=mask,
                                         ce_weight=0.5)),
           ("kl-forward", dict(kind="forward", temperature=2.0, labels=labels)),
           ("kl-reverse", dict(kind="reverse", reduction="none", mask=mask))]
    )


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process_torch_backend(world):
    _run(world, "torch", _cases())


@pytest.mark.slow
def test_vocab_parallel_triton_backend():
    _, _, labels = _inputs()
    _run(2, "triton", [("csd-ts", dict(weighting="ts", labels=labels)), ("kl-reverse", dict(kind="reverse")),
                       ("csd-ce", dict(weighting="us", labels=labels, ce_weight=0.5))])


def _bad_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student = torch.randn(3 + rank, 10)  # different leading dims across ranks
        with pytest.raises(ValueError, match="different leading shapes across ranks"):
            vocab_parallel_csd_loss(student, student.clone(), check_consistency=True)
        other = dist.new_group([0])  # a group this rank may not belong to
        if rank == 1:
            with pytest.raises(ValueError, match="not a member of `group`"):
                vocab_parallel_csd_loss(student, student.clone(), group=other)
        with pytest.raises(ValueError, match="must cover the student shard's columns exactly"):
            vocab_parallel_csd_loss(student, torch.randn(3 + rank, 11))
        with pytest.raises(TypeError, match="unsupported keyword"):
            vocab_parallel_csd_loss(student, student.clone(), return_components=True)
        with pytest.raises(ValueError, match="needs `labels`"):
            vocab_parallel_csd_loss(student, student.clone(), ce_weight=1.0)
        # A label no rank owns (out of the global vocabulary) gives NaN, as in csd_loss.
        student = torch.randn(3, 10)  # now the same leading shape on both ranks
        labels = torch.full((3,), 10 * 2 + 5)
        shard = student.clone().requires_grad_(True)
        loss = vocab_parallel_csd_loss(shard, student.clone(), labels=labels, ce_weight=1.0, vocab_start=10 * rank,
                                       reduction="none")
        loss.sum().backward()
        assert torch.isnan(loss).all() and torch.isnan(shard.grad).all()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_bad_usage_fails_clearly():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bad_worker, args=(2, os.path.join(tmp, "rendezvous")), nprocs=2, join=True)


def test_without_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        vocab_parallel_csd_loss(torch.randn(2, 5), torch.randn(2, 5))


@pytest.mark.gpu
def test_nccl_needs_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL vocabulary-parallel test needs at least 2 GPUs")
