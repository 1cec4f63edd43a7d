"""CSDTrainer's fused-linear loss under DeepSpeed ZeRO-3 (2 gloo processes on CPU, DeepSpeed's CPU
accelerator): a partitioned output head tied to the input embeddings (GPT-2) is gathered for the loss,
and loss and gradients equal one process; an untied head is refused with a clear error."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from test_fsdp import _batch, _loss, _models  # noqa: E402


def _worker(rank, world, init_file, out_file, arch):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        deepspeed.init_distributed(dist_backend="gloo")
        student, teacher = _models(arch)
        config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=config)
        head = student.get_output_embeddings().weight
        partitioned = tuple(head.shape) == (0,) and hasattr(head, "ds_id")
        loss = _loss(engine, student, teacher)
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in student.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads, "partitioned": partitioned}, out_file)
    finally:
        dist.destroy_process_group()


def test_untied_head_under_zero3_is_refused_clearly(monkeypatch):
    """An untied (or biased) ZeRO-3 head would receive its whole gradient while partitioned (what an
    untied Llama under deepspeed.initialize does in backward): refused before any work, not wrong. The
    rule reads DeepSpeed's parameter marker, so it is checked here in one process, DeepSpeed stubbed."""
    import sys
    from types import SimpleNamespace

    from csd_kernels.integrations.transformers import _gathered_heads

    gathered = SimpleNamespace(GatheredParameters=lambda params, modifier_rank: ("gathered", params, modifier_rank))
    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace(zero=gathered))
    student, teacher = _models("llama")
    student.get_output_embeddings().weight.ds_id = 0  # what ZeRO-3 partitioning attaches
    with pytest.raises(NotImplementedError, match="supports output heads tied to the input embeddings"):
        _gathered_heads(student, teacher)
    tied, _ = _models("gpt2")
    weight = tied.get_output_embeddings().weight
    weight.ds_id = 0
    assert _gathered_heads(tied, teacher) == ("gathered", [weight], None)  # read-only gather of the tied head


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2"])
def test_fused_linear_loss_under_zero3_matches_one_process(arch):
    student, teacher = _models(arch)
    want = _loss(student, student, teacher)
    want.backward()
    expected = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), out, arch), nprocs=2, join=True)
        got = torch.load(out)
    assert got["partitioned"], "the output head was not partitioned: the test would prove nothing"
    assert abs(float(got["loss"]) - float(want)) <= 1e-5 * abs(float(want))
    for name, grad in expected.items():
        err = (got["grads"][name] - grad).abs().max().item()
        assert err <= 2e-5 * max(grad.abs().max().item(), 1e-3), f"{name}: max error {err:.3g}"
