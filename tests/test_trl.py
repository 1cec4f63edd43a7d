"""CSDDistillationTrainer (TRL's on-policy DistillationTrainer with CSD) on tiny local models: no download.

The tokenizer is built here with the `tokenizers` package (a word-level vocabulary of a few dozen
tokens), the models are randomly initialised GPT-2s, and generation runs on CPU.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from csd_kernels import csd_loss  # noqa: E402
from helpers import assert_close  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "rug", "and", "then", "it", "was", "red", "blue"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def gpt2(vocab, seed, layers=1):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=layers, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                     eos_token_id=1, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"prompt": [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
        for k in torch.randint(2, 6, (n,), generator=g)]})


def make_trainer(tmp_path, max_steps=2, grad_accum=1, **loss_fields):
    from csd_kernels.integrations.trl import CSDDistillationConfig, CSDDistillationTrainer

    tok = tokenizer()
    args = CSDDistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=grad_accum,
        max_steps=max_steps, max_completion_length=4, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, csd_backend="torch", **loss_fields)
    return CSDDistillationTrainer(model=gpt2(len(tok), 0), teacher_model=gpt2(len(tok), 1, layers=2), args=args,
                                  train_dataset=prompts(), processing_class=tok)


def test_on_policy_steps_run_and_log_csd(tmp_path):
    trainer = make_trainer(tmp_path, weighting="ts", ce_weight=0.3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())), "no parameter moved"
    logged = [h for h in trainer.state.log_history if "csd" in h]
    assert logged and all(h["csd"] > 0 and h["ce"] > 0 for h in logged), trainer.state.log_history


def _fixed_batch(tok, device="cpu"):
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, len(tok), (3, 5), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, len(tok), (3, 4), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 2:] = 0  # a completion that ended early
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


def _reference_loss(trainer, batch, reduction="mean", num_items=None, **loss):
    """csd_loss of the two models' logits on the completion tokens (each position predicts the next)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    k = batch["completion_ids"].shape[1]
    s = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    with torch.no_grad():
        t = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    return csd_loss(s, t, labels=batch["completion_ids"], mask=batch["completion_mask"] != 0, backend="torch",
                    reduction=reduction, num_items_in_batch=num_items, **loss)


def test_loss_on_a_fixed_batch_is_csd_of_the_logits(tmp_path):
    fields = dict(weighting="st", ce_weight=0.4, csd_temperature=1.5, teacher_temperature=0.7)
    trainer = make_trainer(tmp_path, **fields)
    batch = _fixed_batch(trainer.processing_class)
    got, _, n_valid = trainer._compute_loss(trainer.model, batch, None)
    want = _reference_loss(trainer, batch, weighting="st", ce_weight=0.4, temperature=1.5, teacher_temperature=0.7)
    assert_close(got, want, name="CSDDistillationTrainer loss")
    assert int(n_valid) == int(batch["completion_mask"].sum())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches each normalised by the tokens of both (TRL's num_items_in_batch) give the
    gradient of one batch of twice the size."""
    trainer = make_trainer(tmp_path, weighting="ts", ce_weight=0.2)
    batch = _fixed_batch(trainer.processing_class)
    big = {k: torch.cat([v, v.flip(0)]) for k, v in batch.items()}
    halves = [{k: v[:3] for k, v in big.items()}, {k: v[3:] for k, v in big.items()}]
    num_items = big["completion_mask"].sum()

    def grads(micro_batches, denominator):
        trainer.model.zero_grad()
        for b in micro_batches:
            loss, _, _ = trainer._compute_loss(trainer.model, b, denominator)
            loss.backward()
        return [p.grad.clone() for p in trainer.model.parameters()]

    for one, accumulated in zip(grads([big], None), grads(halves, num_items)):
        assert_close(accumulated, one, name="accumulated gradient")


def test_importing_the_package_does_not_import_trl():
    import subprocess
    import sys

    code = ("import sys, csd_kernels, csd_kernels.integrations.transformers; "
            "print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
