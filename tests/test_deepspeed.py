"""CSDTrainer's fused-linear loss under DeepSpeed ZeRO-3 (2 gloo processes on CPU, DeepSpeed's CPU
accelerator): a partitioned output head tied to the input embeddings (GPT-2) is gathered for the loss,
and loss and gradients equal one process; an untied head is refused with a clear error."""

import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from test_fsdp import _loss, _models, run_against_one_process  # noqa: E402


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
    got = run_against_one_process(_worker, arch)
    assert got["partitioned"], "the output head was not partitioned: the test would prove nothing"
