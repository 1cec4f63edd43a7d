"""CSDTrainer's fused-linear loss under DeepSpeed ZeRO-3 (2 gloo processes on CPU, DeepSpeed's CPU
accelerator): partitioned output heads, tied, untied and biased, give the loss and gradients of one
process."""

import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from test_fsdp import _loss, _models, finish, run_against_one_process  # noqa: E402


def _worker(rank, world, init_file, out_file, archs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        deepspeed.init_distributed(dist_backend="gloo")
        records = {}
        for arch in archs:
            student, teacher = _models(arch)
            config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
            engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=config)
            head = list(student.get_output_embeddings().parameters())
            partitioned = all(tuple(p.shape) == (0,) and hasattr(p, "ds_id") for p in head)
            loss = _loss(engine, student, teacher)
            engine.backward(loss)
            grads = {n: safe_get_full_grad(p).detach().clone() for n, p in student.named_parameters()}
            records[arch] = {"loss": loss.detach(), "grads": grads, "partitioned": partitioned,
                             "head_parameters": len(head)}
            engine.destroy()  # its hooks, partitioned parameters and communication state, before the next
    except BaseException:
        dist.destroy_process_group()
        raise
    finish(rank, records, out_file)


# A head tied to the input embeddings (GPT-2), an untied head (Llama) and an untied head with a bias.
ARCHS = {"gpt2": 1, "llama": 1, "llama-bias": 2}


@pytest.mark.slow
def test_fused_linear_loss_under_zero3_matches_one_process():
    """The loss runs as the student head's forward, so ZeRO-3 gathers the head for it and for its
    backward and reduce-scatters the head's gradients whole, tied or not, with a bias or not."""
    records = run_against_one_process(_worker, list(ARCHS))
    for arch, parameters in ARCHS.items():
        assert records[arch]["partitioned"], f"{arch}: the output head was not partitioned: the test would prove nothing"
        assert records[arch]["head_parameters"] == parameters, arch
