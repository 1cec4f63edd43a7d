"""CSDTrainer and causal_lm_csd_loss on tiny randomly initialised GPT-2 models (CPU, no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import reference  # noqa: E402
from csd_kernels import csd_loss  # noqa: E402
from csd_kernels.integrations.transformers import CSDTrainer, causal_lm_csd_loss  # noqa: E402
from helpers import assert_close  # noqa: E402


def tiny_gpt2(vocab, layers=1, width=32, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class TokenDataset(torch.utils.data.Dataset):
    """Random sequences; `prompt=True` excludes a prompt of 2-4 tokens, `prompt=False` counts position 0
    and pads the end instead (where a shifted and an unshifted token count differ)."""

    def __init__(self, n=16, length=12, vocab=100, seed=0, prompt=True):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.prompt = prompt

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        if self.prompt:
            labels[: 2 + i % 3] = -100  # a prompt that does not count
        else:
            labels[len(labels) - i % 3 :] = -100  # padding at the end
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


@pytest.mark.parametrize("vocabs", [(100, 100), (100, 112), (112, 100)],
                         ids=["same-vocab", "teacher-padded", "student-padded"])
def test_helper_shifts_masks_and_handles_padded_vocabularies(vocabs):
    v_s, v_t = vocabs
    student = torch.randn(2, 9, v_s)
    teacher = torch.randn(2, 9, v_t)
    labels = torch.randint(0, 100, (2, 9))
    labels[0, :3] = -100
    v = min(v_s, v_t)
    got = causal_lm_csd_loss(student, teacher, labels, weighting="ts", ce_weight=0.5, backend="torch")
    want = csd_loss(student[:, :-1, :v].contiguous(), teacher[:, :-1, :v].contiguous(), labels=labels[:, 1:],
                    weighting="ts", ce_weight=0.5)
    assert_close(got, want, name="causal_lm_csd_loss")
    csd_only = causal_lm_csd_loss(student, teacher, labels, backend="torch")
    assert_close(csd_only, reference.csd_loss(student[:, :-1, :v], teacher[:, :-1, :v], labels=labels[:, 1:]))


def _trainer(tmp_path, student, teacher, grad_accum=2, max_steps=3, dataset=None, **loss_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return CSDTrainer(model=student, args=args, train_dataset=dataset or TokenDataset(), teacher_model=teacher,
                      backend="torch", **loss_kwargs)


def test_csd_trainer_trains_and_logs_components(tmp_path):
    student, teacher = tiny_gpt2(100), tiny_gpt2(112, layers=2, seed=1)  # teacher vocabulary padded
    before = [p.detach().clone() for p in student.parameters()]
    trainer = _trainer(tmp_path, student, teacher, weighting="ts", ce_weight=0.3)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters())), "no parameter moved"
    logged = [h for h in trainer.state.log_history if "csd" in h]
    assert logged and all(h["csd"] > 0 and h["ce"] > 0 for h in logged)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_csd_trainer_loss_uses_num_items_in_batch(tmp_path):
    """compute_loss normalises by the Trainer's num_items_in_batch: the sum over the batch divided by it."""
    student, teacher = tiny_gpt2(100), tiny_gpt2(100, seed=1)
    trainer = _trainer(tmp_path, student, teacher, ce_weight=0.5)
    batch = {k: torch.stack([TokenDataset()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    num_items = torch.tensor(17)
    got = trainer.compute_loss(student, dict(batch), num_items_in_batch=num_items)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
    total = causal_lm_csd_loss(student(input_ids=batch["input_ids"]), teacher_logits, batch["labels"],
                               reduction="sum", ce_weight=0.5, backend="torch")
    assert_close(got, total / 17, name="loss with num_items_in_batch")


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches, each normalised by the tokens of both, give the big batch's gradient."""
    model = tiny_gpt2(100)
    teacher = tiny_gpt2(100, seed=1)
    data = TokenDataset(n=4)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
    num_items = (batch["labels"][:, 1:] != -100).sum()

    def grads(slices):
        model.zero_grad()
        for rows in slices:
            out = model(input_ids=batch["input_ids"][rows])
            causal_lm_csd_loss(out, teacher_logits[rows], batch["labels"][rows], num_items_in_batch=num_items,
                               weighting="ts", ce_weight=0.2, backend="torch").backward()
        return [p.grad.clone() for p in model.parameters()]

    for big, accumulated in zip(grads([slice(0, 4)]), grads([slice(0, 2), slice(2, 4)])):
        assert_close(accumulated, big, name="accumulated gradient")


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weighting", ["ss", "ts"])
def test_training_follows_the_reference_trajectory(backend, weighting, small_blocks):
    """30 Adam steps with csd_loss track 30 steps with reference.csd_loss: same loss at every step
    within 1e-4 relative (both fp32, so only summation order differs, compounding over the steps)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 10), generator=g)
    teacher_logits = (3.0 * torch.randn(64, 64, generator=g))[ids]  # a function of the token: learnable
    labels = ids.clone()
    labels[:, :2] = -100
    trajectories = []
    for fn in (reference.csd_loss, lambda *a, **k: csd_loss(*a, backend=backend, **k)):
        model = TinyLM()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = fn(model(ids)[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], weighting=weighting)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append(torch.tensor(losses))
    ref, got = trajectories
    assert ref[-1] < 0.5 * ref[0], "the reference run did not learn: the test would prove nothing"
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel < 1e-4, f"trajectories diverge: max relative difference {rel:.3g}"


def tiny_llama(vocab, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


ARCHITECTURES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_trainer_counts_the_positions_the_loss_sums(tmp_path, arch):
    """num_items_in_batch counts labels[..., 1:] (what the shifted loss sums), whatever the config says:
    GPT-2 under transformers 5 has loss_type=None, for which Trainer itself counts unshifted labels."""
    make = ARCHITECTURES[arch]
    trainer = _trainer(tmp_path, make(100), make(100, seed=1), max_steps=1, dataset=TokenDataset(prompt=False))
    data = TokenDataset(prompt=False)
    batches = [{k: torch.stack([data[i][k] for i in rows]) for k in ("input_ids", "labels")}
               for rows in ((0, 1), (2, 3))]
    expected = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    unshifted = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert expected != unshifted  # the test can tell them apart
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == expected

    seen = []  # (labels of the micro-batch, num_items_in_batch passed with it)
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, num_items_in_batch=None, **kwargs):
        seen.append((inputs["labels"].clone(), num_items_in_batch))
        return compute_loss(model, inputs, *args, num_items_in_batch=num_items_in_batch, **kwargs)

    trainer.compute_loss = recording
    trainer.train()  # one optimizer step of two accumulated micro-batches
    assert len(seen) == 2
    step_count = sum(int((labels[:, 1:] != -100).sum()) for labels, _ in seen)
    assert [int(n) for _, n in seen] == [step_count] * 2, (seen, step_count)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_eval_loss_is_the_mean_over_shifted_positions(tmp_path, arch):
    make = ARCHITECTURES[arch]
    student, teacher = make(100), make(100, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0)
    data = TokenDataset(n=4, prompt=False)
    trainer = CSDTrainer(model=student, args=args, eval_dataset=data, teacher_model=teacher, backend="torch",
                         weighting="ts", ce_weight=0.5)
    got = trainer.evaluate()["eval_loss"]
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        expected = causal_lm_csd_loss(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                      teacher(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits,
                                      batch["labels"], weighting="ts", ce_weight=0.5, backend="torch")
    assert abs(got - expected.item()) <= 1e-5 * abs(expected.item()), (got, expected.item())


def test_trainer_rejects_bad_loss_arguments_at_construction(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        _trainer(tmp_path, tiny_gpt2(100), tiny_gpt2(100), temperature=0.0)
    with pytest.raises(ValueError, match="weighting"):
        _trainer(tmp_path, tiny_gpt2(100), tiny_gpt2(100), weighting="xx")


# ----------------------------------------------------------------------------------------------------
# offline top-k distillation (issue 15)
# ----------------------------------------------------------------------------------------------------
def _token_dataset(n=8, vocab=100, lengths=(12, 12), seed=0):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g)
    ids = [torch.randint(0, vocab, (int(size),), generator=g).tolist() for size in sizes]
    labels = [[-100] * 2 + row[2:] for row in ids]  # a prompt of two tokens that does not count
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
                                       "labels": labels})


def _topk_trainer(tmp_path, student, dataset, collator=None, max_steps=3, **loss_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return CSDTrainer(model=student, args=args, train_dataset=dataset, teacher_model=None, backend="torch",
                      data_collator=collator, **loss_kwargs)


def test_add_teacher_topk_matches_teacher_topk():
    from csd_kernels import teacher_topk
    from csd_kernels.integrations.transformers import add_teacher_topk

    teacher = tiny_gpt2(100, seed=1)
    data = add_teacher_topk(_token_dataset(n=5, lengths=(6, 11)), teacher, 8, batch_size=2,
                            logprobs_dtype="float32")
    assert data.features["teacher_ids"].feature.feature.dtype == "int32"
    for row in data:
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits
        ids, logprobs = teacher_topk(logits[0], 8)
        assert torch.equal(torch.tensor(row["teacher_ids"]), ids)  # right padding changed nothing
        assert_close(torch.tensor(row["teacher_logprobs"]), logprobs, name="cached logprobs")
    half = add_teacher_topk(_token_dataset(n=2), teacher, 4, logprobs_dtype="float16")
    assert half.features["teacher_logprobs"].feature.feature.dtype == "float16"
    assert add_teacher_topk(_token_dataset(n=2), teacher, 4).features["teacher_logprobs"].feature.feature.dtype == "float32"
    with pytest.raises(ValueError, match="logprobs_dtype must be one of"):
        add_teacher_topk(_token_dataset(n=2), teacher, 4, logprobs_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"k must lie in \[1, V\] = \[1, 100\]"):
        add_teacher_topk(_token_dataset(n=2), teacher, 101)


def test_offline_trainer_with_the_full_distribution_matches_the_online_one(tmp_path):
    """K = V, no tail, float32 cache: the coarsened rows are the whole vocabulary, and log-probabilities
    differ from logits by a per-row constant, so offline training equals online training step by step."""
    from csd_kernels.integrations.transformers import add_teacher_topk

    teacher = tiny_gpt2(100, seed=1)
    data = _token_dataset()
    cached = add_teacher_topk(data, teacher, 100, logprobs_dtype="float32")
    histories = []
    for dataset, teacher_model in ((data, teacher), (cached, None)):
        student = tiny_gpt2(100)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=0, dataloader_num_workers=0)
        trainer = CSDTrainer(model=student, args=args, train_dataset=dataset, teacher_model=teacher_model,
                             backend="torch", weighting="ts", ce_weight=0.3, tail=False)
        trainer.train()
        histories.append(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h]))
    assert_close(histories[1], histories[0], name="offline loss history")


def test_offline_trainer_trains_from_cached_columns(tmp_path):
    from csd_kernels.integrations.transformers import TopKDataCollator, add_teacher_topk

    teacher = tiny_gpt2(100, seed=1)
    cached = add_teacher_topk(_token_dataset(lengths=(7, 12)), teacher, 8, logprobs_dtype="float16")  # ragged
    del teacher  # not needed any more
    student = tiny_gpt2(100)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = _topk_trainer(tmp_path, student, cached, collator=TopKDataCollator(), weighting="ts", ce_weight=0.3)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters())), "no parameter moved"
    logged = [h for h in trainer.state.log_history if "csd" in h]
    assert logged and all(h["csd"] > 0 and h["ce"] > 0 for h in logged)


def test_offline_trainer_loss_is_the_topk_loss(tmp_path):
    """compute_loss on one collated batch: causal_lm_topk_csd_loss with num_items_in_batch."""
    from csd_kernels import topk_csd_loss
    from csd_kernels.integrations.transformers import TopKDataCollator, add_teacher_topk

    cached = add_teacher_topk(_token_dataset(n=3, lengths=(6, 10)), tiny_gpt2(100, seed=1), 5)
    student = tiny_gpt2(100)
    trainer = _topk_trainer(tmp_path, student, cached, collator=TopKDataCollator(), ce_weight=0.5)
    batch = TopKDataCollator()([cached[i] for i in range(3)])
    got = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(11))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = topk_csd_loss(logits[:, :-1], batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1],
                         labels=batch["labels"][:, 1:], reduction="sum", ce_weight=0.5, backend="torch") / 11
    assert_close(got, want, name="offline loss")
    with pytest.raises(ValueError, match="which this batch lacks"):
        trainer.compute_loss(student, {k: batch[k] for k in ("input_ids", "labels")})


# ----------------------------------------------------------------------------------------------------
# fused_linear=True: no (N, V) logits of either model (issue 16)
# ----------------------------------------------------------------------------------------------------
def tiny_gemma2(vocab, seed=0, softcap=2.0):
    """Gemma-2-style: tied embeddings, final-logit softcapping (tight, so tanh bends the logits)."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=32, final_logit_softcapping=softcap,
                                       attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(config)


def tiny_cohere_like(vocab, seed=0):
    """A Llama with an untied output head with a bias and a Cohere-style logit_scale in its config."""
    model = tiny_llama(vocab, seed=seed)
    model.config.logit_scale = 0.5
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    model.lm_head = head

    forward = model.forward

    def scaled(*args, **kwargs):  # what Cohere's forward does with its logits
        out = forward(*args, **kwargs)
        out.logits = out.logits * model.config.logit_scale
        return out

    model.forward = scaled
    return model


FUSED_ARCHS = {"gpt2": tiny_gpt2, "gemma2": tiny_gemma2, "llama": tiny_llama}


@pytest.mark.parametrize("arch", list(FUSED_ARCHS))
def test_fused_linear_trainer_matches_the_logits_path(tmp_path, arch):
    """Same loss, components and gradients as the default path; teacher vocabulary padded."""
    make = FUSED_ARCHS[arch]
    data = TokenDataset(n=4)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    results = []
    for fused in (False, True):
        student, teacher = make(100), make(112, seed=1)
        trainer = _trainer(tmp_path, student, teacher, weighting="ts", ce_weight=0.3, fused_linear=fused)
        student.train()
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(29))
        loss.backward()
        sums = trainer._component_sums
        results.append((loss.detach(), float(sums["csd"]), float(sums["ce"]),
                        {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (loss0, csd0, ce0, g0), (loss1, csd1, ce1, g1) = results
    assert_close(loss1, loss0, name="fused-linear trainer loss")
    assert abs(csd1 - csd0) <= 1e-5 * abs(csd0) and abs(ce1 - ce0) <= 1e-5 * abs(ce0)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert_close(g1[name], g0[name], name=f"gradient of {name}")


def test_fused_linear_trainer_reads_the_heads_postprocessing(tmp_path):
    """An untied head with a bias and a config logit_scale: the loss sees the scaled logits."""
    from csd_kernels.integrations.transformers import logit_postprocessing

    student, teacher = tiny_cohere_like(100), tiny_cohere_like(100, seed=1)
    assert logit_postprocessing(student.config) == {"logit_scale": 0.5, "softcap": None}
    data = TokenDataset(n=2)
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("input_ids", "labels")}
    fused = _trainer(tmp_path, student, teacher, fused_linear=True).compute_loss(student, dict(batch))
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    want = causal_lm_csd_loss(student(input_ids=batch["input_ids"]), t_logits, batch["labels"], backend="torch")
    assert_close(fused, want, name="loss with logit_scale and a biased head")


def test_logit_postprocessing_names():
    from types import SimpleNamespace

    from csd_kernels.integrations.transformers import logit_postprocessing

    cases = [
        (dict(logit_scale=None), 1.0), (dict(logit_scale=0.0625), 0.0625), (dict(output_multiplier=2.0), 2.0),
        (dict(lm_head_multiplier=0.25), 0.25), (dict(logits_scaling=8.0, model_type="granite"), 0.125),
        (dict(logits_scaling=8.0, model_type="hyperclovax"), 8.0), ({}, 1.0),
    ]
    for fields, scale in cases:
        assert logit_postprocessing(SimpleNamespace(**fields))["logit_scale"] == scale, fields
    assert logit_postprocessing(SimpleNamespace(final_logit_softcapping=30.0))["softcap"] == 30.0


def test_fused_linear_needs_a_teacher_model(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher_model"):
        _trainer(tmp_path, tiny_gpt2(100), None, fused_linear=True)
