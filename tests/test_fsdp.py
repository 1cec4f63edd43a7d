"""CSDTrainer's fused-linear loss under FSDP2 (`fully_shard`, 2 gloo processes on CPU): the output
weight is a DTensor, gathered once with `full_tensor()`; loss and gradients equal one unsharded process."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)


def _models(arch):
    def make(seed, vocab):
        torch.manual_seed(seed)
        if arch == "gpt2":  # tied embeddings, in the root's parameter group
            config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            return transformers.GPT2LMHeadModel(config)
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
        if arch == "llama-bias":  # an untied head with a bias
            model.lm_head = torch.nn.Linear(32, vocab, bias=True)
        return model

    return make(0, 100), make(1, 112)


# How each architecture is sharded, and the type of its output weight when the loss reads it: the root's
# own parameters stay unsharded after its forward (FSDP2 reshards them after the backward); an lm_head
# sharded as its own unit is resharded after its forward, a DTensor that `full_tensor()` gathers.
ARCHS = {"gpt2": "Parameter", "llama": "DTensor"}


def _shard(student, arch):
    from torch.distributed.fsdp import fully_shard

    blocks = student.transformer.h if arch == "gpt2" else student.model.layers
    for block in blocks:
        fully_shard(block)
    if arch == "llama":
        fully_shard(student.lm_head)
    fully_shard(student)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def _loss(model, unwrapped, teacher):
    from csd_kernels.integrations.transformers import fused_linear_causal_lm_loss

    inputs, labels = _batch()
    loss, csd, ce, _ = fused_linear_causal_lm_loss(model, unwrapped, teacher, inputs, labels, weighting="ts",
                                                   ce_weight=0.3, backend="torch",
                                                   num_items_in_batch=torch.tensor(32))
    return loss


def _worker(rank, world, init_file, out_file, archs):
    import csd_kernels.integrations.transformers as integration

    seen = []
    read_head = integration._output_head

    def recording(model):  # the type of the output weight when the loss reads it
        seen.append(type(model.get_output_embeddings().weight).__name__)
        return read_head(model)

    integration._output_head = recording

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records = {}
        for arch in archs:
            seen.clear()
            student, teacher = _models(arch)
            _shard(student, arch)
            loss = _loss(student, student, teacher)
            loss.backward()
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()
                     for n, p in student.named_parameters() if p.grad is not None}
            records[arch] = {"loss": loss.detach(), "grads": grads, "heads": list(seen)}
    except BaseException:
        dist.destroy_process_group()
        raise
    finish(rank, records, out_file)


def finish(rank, records, out_file):
    """The end of a worker that computed its records: rank 0 saves them, both ranks meet, and the process
    ends at once, skipping the interpreter's teardown. Why: in clean-clone CI runs on 2 busy cores, one
    rank now and then died there of SIGABRT, "terminate called without an active exception" (the
    message gloo's threads give when a process group is torn down late, pytorch/pytorch#190489), after
    rank 0 had saved its results: in the libraries' exit, not in the computation under test."""
    import sys

    if rank == 0:
        torch.save(records, out_file)
    dist.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_against_one_process(worker, archs):
    """Run `worker(rank, world, init_file, out_file, archs)` once on 2 gloo processes (one start-up for
    all the architectures) and check rank 0's saved loss and full gradients of each architecture against
    one unsharded process; returns rank 0's records {arch: record} for further checks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        try:
            mp.spawn(worker, args=(2, os.path.join(tmp, "init"), out, archs), nprocs=2, join=True)
        except mp.ProcessExitedException as error:  # a crash, not an exception: say when it happened
            when = "after rank 0 saved its results" if os.path.exists(out) else "before rank 0 saved its results"
            raise AssertionError(f"{error} ({when})") from error
        records = torch.load(out)
    for arch in archs:
        student, teacher = _models(arch)
        want = _loss(student, student, teacher)
        want.backward()
        got = records[arch]
        assert abs(float(got["loss"]) - float(want)) <= 1e-5 * abs(float(want)), arch
        expected = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
        assert got["grads"].keys() >= expected.keys(), arch
        for name, grad in expected.items():
            err = (got["grads"][name] - grad).abs().max().item()
            assert err <= 2e-5 * max(grad.abs().max().item(), 1e-3), f"{arch} {name}: max error {err:.3g}"
    return records


@pytest.mark.slow
def test_fused_linear_loss_under_fsdp2_matches_one_process():
    records = run_against_one_process(_worker, list(ARCHS))
    for arch, head_type in ARCHS.items():
        assert records[arch]["heads"][0] == head_type, (arch, records[arch]["heads"])
