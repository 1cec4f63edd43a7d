"""transformers integration: `CSDTrainer`, the `causal_lm_csd_loss` / `causal_lm_topk_csd_loss` helpers
for custom loops, and offline top-k distillation (`add_teacher_topk`, `TopKDataCollator`).

    pip install -e ".[hf]"

Offline distillation is two calls: cache the teacher's top-k once, then train without it:

    data = add_teacher_topk(data, teacher, k=32)            # adds teacher_ids, teacher_logprobs
    CSDTrainer(model=student, args=args, train_dataset=data, teacher_model=None).train()

Importing `csd_kernels` never imports transformers; importing this module does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from transformers import Trainer
from transformers import __version__ as transformers_version

from ..contract import check_flag
from ..fused_linear import fused_linear_csd_loss
from ..loss import CSDLoss, csd_loss
from ..topk import teacher_topk, topk_csd_loss

# The dataset columns of a top-k teacher, aligned with input_ids as logits are: (L, K) per sequence.
TOPK_COLUMNS = ("teacher_ids", "teacher_logprobs")

_MISSING = object()
_LOSS_KEYWORDS = ("weighting", "temperature", "teacher_temperature", "ce_weight", "csd_weight", "backend",
                  "ignore_index", "inplace_backward")


def causal_lm_csd_loss(student_outputs_or_logits, teacher_logits, labels: torch.Tensor, *,
                       num_items_in_batch=None, return_components: bool = False, **csd_loss_keywords):
    """CSD (+ optional cross-entropy) for next-token prediction: shifts by one position and masks -100.

    Args:
        student_outputs_or_logits: a model output with `.logits`, or logits (B, L, V_s).
        teacher_logits: (B, L, V_t). Student and teacher may pad their vocabularies differently: the
            shared vocabulary is the first min(V_s, V_t) entries (a student's extra padding columns
            get zero gradient).
        labels: (B, L) token ids, -100 where no prediction counts (padding, prompt). Position i predicts
            token i + 1, so the loss reads logits[:, :-1] and labels[:, 1:] (views, no copies).
        num_items_in_batch: the number of counted (shifted) labels over the whole accumulated, possibly
            multi-device batch, as transformers' Trainer passes it; None: the mean over this batch.
        **csd_loss_keywords: weighting, temperature, teacher_temperature, ce_weight, csd_weight, ...

    Returns the loss, or (loss, csd, ce) with `return_components=True`.
    """
    logits = getattr(student_outputs_or_logits, "logits", student_outputs_or_logits)
    vocab = min(logits.shape[-1], teacher_logits.shape[-1])
    return csd_loss(logits[:, :-1, :vocab], teacher_logits[:, :-1], labels=labels[:, 1:],
                    num_items_in_batch=num_items_in_batch, return_components=return_components,
                    **csd_loss_keywords)


def causal_lm_topk_csd_loss(student_outputs_or_logits, teacher_ids, teacher_logprobs, labels: torch.Tensor, *,
                            num_items_in_batch=None, return_components: bool = False, **topk_keywords):
    """`topk_csd_loss` for next-token prediction: `causal_lm_csd_loss` with a top-k teacher.

    teacher_ids, teacher_logprobs: (B, L, K), aligned with the inputs as the teacher's logits would be
    (position i holds the teacher's top-k for token i + 1); ids index the student's vocabulary.
    **topk_keywords: tail, weighting, temperature, ce_weight, ... of `topk_csd_loss`.
    """
    logits = getattr(student_outputs_or_logits, "logits", student_outputs_or_logits)
    return topk_csd_loss(logits[:, :-1], teacher_ids[:, :-1], teacher_logprobs[:, :-1], labels=labels[:, 1:],
                         num_items_in_batch=num_items_in_batch, return_components=return_components,
                         **topk_keywords)


def _final_hidden_states(model, unwrapped, inputs):
    """(final hidden states (B, L, H), the model's output) without the (B, L, V) logits.

    Through `model` (the training wrapper, so that DDP/FSDP hooks run) with `logits_to_keep=1`, capturing
    the backbone's output with a forward hook; a model without `logits_to_keep` runs its backbone alone."""
    backbone = unwrapped.base_model
    if backbone is unwrapped:
        raise ValueError(f"fused_linear=True needs a model with a separate backbone (`base_model`); "
                         f"{type(unwrapped).__name__} has none")
    if "logits_to_keep" not in inspect.signature(unwrapped.forward).parameters:
        out = backbone(**inputs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state, out
    captured = {}

    def keep(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = backbone.register_forward_hook(keep)
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["hidden"], outputs


def _output_head(model):
    """(weight (V, H), bias or None) of the output embeddings; a DTensor (FSDP2) as its full tensor,
    gathered once per loss call with autograd (its backward reduce-scatters the gradient)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"fused_linear=True needs output embeddings; {type(model).__name__}.get_output_embeddings() "
                         "is None")
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return weight, bias
    weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
    bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def fused_linear_causal_lm_loss(model, unwrapped, teacher, inputs, labels, *, shift_labels=None,
                                num_items_in_batch=None, **csd_loss_keywords):
    """`CSDTrainer(fused_linear=True)`'s loss: (loss, csd, ce, the student's output) from both models'
    final hidden states and output heads, without either model's (N, V) logits.

    `model` is the student as the training engine wraps it (DDP, FSDP2, ...), `unwrapped` the model
    itself; `labels` (B, L) are shifted here unless the collator gave `shift_labels`. The shared
    vocabulary is the first min(V_s, V_t) entries, as on the logits path."""
    student_hidden, outputs = _final_hidden_states(model, unwrapped, inputs)
    if next(teacher.parameters()).device != student_hidden.device:
        teacher.to(student_hidden.device)
    teacher.eval()
    with torch.no_grad():
        teacher_hidden, _ = _final_hidden_states(teacher, teacher, inputs)
    if shift_labels is None:
        student_hidden, teacher_hidden, labels = student_hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    loss, csd, ce = fused_head_loss(unwrapped, teacher, student_hidden, teacher_hidden, labels=labels,
                                    num_items_in_batch=num_items_in_batch, **csd_loss_keywords)
    return loss, csd, ce, outputs


def fused_head_loss(student, teacher, student_hidden, teacher_hidden, **loss_keywords):
    """(loss, csd, ce) of `fused_linear_csd_loss` through both models' output heads: each model's own
    weight, bias and `logit_postprocessing`, over the shared first min(V_s, V_t) vocabulary entries;
    the tensors are moved to the student head's device. Sharded heads: an FSDP2 (DTensor) weight
    is gathered with `full_tensor()`; under DeepSpeed ZeRO-3 the loss runs as the student head's
    forward (`_as_forward_of`) and the teacher's head is gathered read-only.

    **loss_keywords: labels, mask, num_items_in_batch, weighting, ... of `fused_linear_csd_loss`."""
    s_post, t_post = logit_postprocessing(student.config), logit_postprocessing(teacher.config)

    def head_loss(hidden):
        s_weight, s_bias = _output_head(student)
        t_weight, t_bias = _output_head(teacher)
        vocab = min(s_weight.shape[0], t_weight.shape[0])
        s_weight = s_weight[:vocab]
        s_bias = s_bias[:vocab] if s_bias is not None else None
        device = s_weight.device  # with a device_map, the backbone may end on another device than the head
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in loss_keywords.items()}
        t_hidden = teacher_hidden.to(device)
        return fused_linear_csd_loss(
            hidden.to(device), s_weight.to(hidden.dtype), teacher_hidden=t_hidden,
            teacher_weight=t_weight.to(t_hidden.dtype), student_bias=s_bias, teacher_bias=t_bias, **s_post,
            teacher_logit_scale=t_post["logit_scale"], teacher_softcap=t_post["softcap"], return_components=True,
            **on_device)

    with _gathered_for_reading(teacher):
        return _as_forward_of(student.get_output_embeddings(), head_loss, student_hidden)


def _zero3_partitioned(module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def _gathered_for_reading(model):
    """A context in which a DeepSpeed ZeRO-3 partitioned output head of the (frozen) `model` is whole:
    a read-only gather, as transformers and TRL gather a teacher's head; a no-op otherwise."""
    head = model.get_output_embeddings()
    if head is None or not _zero3_partitioned(head):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(head.parameters(recurse=False)), modifier_rank=None)


def _as_forward_of(head, fn, hidden):
    """fn(hidden), run as the forward of the output head module when DeepSpeed ZeRO-3 partitions its
    parameters (fn(hidden) directly otherwise).

    ZeRO-3 gathers a module's parameters in hooks around that module's forward and backward and
    reduce-scatters their gradients while they are whole; the loss reads the head's parameters
    without calling the head, so it is run in the head's place for this one call. The head is then
    handled exactly as when the model computes its logits: tied or untied, with or without bias."""
    if head is None or not _zero3_partitioned(head):
        return fn(hidden)
    saved = head.__dict__.get("forward", _MISSING)  # an instance forward (accelerate's hooks) is kept
    head.forward = fn
    try:
        return head(hidden)
    finally:
        if saved is _MISSING:
            del head.forward
        else:
            head.forward = saved


def logit_postprocessing(config) -> Dict[str, Any]:
    """An output head's post-processing from a transformers config, as `fused_linear_csd_loss` takes it:
    {"logit_scale": float, "softcap": float or None}.

    The multiplier is read under the names architectures use for it (as TRL's DistillationTrainer
    reads them): `logit_scale` (Cohere; None means 1), `output_multiplier`, `lm_head_multiplier`
    (Falcon-H1), and `logits_scaling`, which Granite and MiniCPM3 divide by and HyperCLOVA X multiplies
    by. The cap is Gemma 2's `final_logit_softcapping`. A multimodal config is read through its text
    config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "softcap": getattr(config, "final_logit_softcapping", None)}


class CSDTrainer(Trainer):
    """A `transformers.Trainer` that distils a frozen teacher into the model with CSD.

    Both models run on each batch; the student is called without `labels` (so it does not compute a
    second, full cross-entropy), and the loss is `causal_lm_csd_loss` of its logits against the
    teacher's, normalised by the `num_items_in_batch` the Trainer counts over the whole accumulated
    batch, so gradient accumulation and multi-device token averaging give the same update as one big
    batch. The CSD and cross-entropy components are logged as `csd` and `ce`.

    Offline (teacher_model=None): every batch carries the teacher's cached top-k as `teacher_ids` and
    `teacher_logprobs` columns (`add_teacher_topk`), no teacher runs, and the loss is
    `causal_lm_topk_csd_loss` (pad variable-length batches with `TopKDataCollator`).

    Args:
        teacher_model: the teacher, moved to the student's device, put in eval mode and frozen; None to
            train from the dataset's top-k columns.
        weighting, temperature, teacher_temperature, ce_weight, csd_weight, backend: as in `csd_loss`.
        tail: offline only, `topk_csd_loss`'s tail bucket.
        fused_linear: run each model's backbone for its final hidden states (the full forward with
            `logits_to_keep=1`, the backbone's output captured, where the model takes `logits_to_keep`;
            the backbone alone otherwise) and compute the loss with `fused_linear_csd_loss` from the
            output embeddings (tied or not, bias if any, the config's `logit_postprocessing`), so that
            neither model's (N, V) logits exist. Same loss, components, normalisation and logging as the
            default logits path. An FSDP2 (DTensor) output weight is gathered once per loss call with
            `full_tensor()`; under DeepSpeed ZeRO-3 the loss runs as the student head's forward, so
            ZeRO-3 gathers that head (tied or not, with bias) and reduces its gradients as it does for
            the logits, and the teacher's head is gathered read-only.
        Everything else goes to `transformers.Trainer`.
    """

    def __init__(self, *args, teacher_model: Optional[torch.nn.Module], weighting="ss", temperature: float = 1.0,
                 teacher_temperature: float = 1.0, ce_weight: float = 0.0, csd_weight: float = 1.0,
                 backend: str = "auto", tail: bool = True, fused_linear: bool = False, **kwargs):
        if not hasattr(Trainer, "_get_num_items_in_batch"):
            raise ImportError("CSDTrainer needs transformers >= 4.57 (Trainer._get_num_items_in_batch), "
                              f"found {transformers_version}")
        if teacher_model is not None and not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module or None, got {type(teacher_model).__name__}")
        check_flag("tail", tail)
        check_flag("fused_linear", fused_linear)
        if fused_linear and teacher_model is None:
            raise ValueError("fused_linear=True projects the teacher's hidden states: it needs a teacher_model "
                             "(offline top-k training never holds the teacher's logits anyway)")
        # Every loss argument is checked now, not at the first training step.
        CSDLoss(weighting=weighting, temperature=temperature, teacher_temperature=teacher_temperature,
                ce_weight=ce_weight, csd_weight=csd_weight, backend=backend)
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model
        if teacher_model is not None:
            self.teacher_model.eval()
            self.teacher_model.requires_grad_(False)
        self.tail = tail
        self.fused_linear = fused_linear
        self.csd_loss_kwargs: Dict[str, Any] = dict(
            weighting=weighting, temperature=temperature, teacher_temperature=teacher_temperature,
            ce_weight=ce_weight, csd_weight=csd_weight, backend=backend)
        # The loss below is normalised by num_items_in_batch: make the Trainer count it (over the
        # shifted labels, for causal LMs) and not divide the loss again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self._component_sums = {"csd": 0.0, "ce": 0.0, "count": 0}

    def _set_signature_columns_if_needed(self):
        # Trainer drops the dataset columns the model's forward does not take: keep the teacher's.
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in TOPK_COLUMNS if c not in self._signature_columns]

    def _get_num_items_in_batch(self, batch_samples, device):
        """Trainer's token count, taken over the positions this loss sums: the shifted labels.

        Trainer counts `labels[..., 1:]` only for models whose config names a causal-LM loss (not GPT-2
        under transformers 5, nor any model under 4.57), so the count is handed to it pre-shifted (or as
        the collator's `shift_labels`); its own cross-process and parallelism handling then applies."""
        shifted = [
            {"labels": batch["shift_labels"] if "shift_labels" in batch else batch["labels"][..., 1:]}
            if isinstance(batch, Mapping) and "labels" in batch else batch
            for batch in batch_samples
        ]
        saved = self.__dict__.get("_loss_shifts_labels", _MISSING)
        self._loss_shifts_labels = False  # already shifted: Trainer must not shift again
        try:
            return super()._get_num_items_in_batch(shifted, device)
        finally:
            if saved is _MISSING:
                del self._loss_shifts_labels
            else:
                self._loss_shifts_labels = saved

    def _teacher_logits(self, inputs, device):
        if next(self.teacher_model.parameters()).device != device:
            self.teacher_model.to(device)
        self.teacher_model.eval()  # Trainer.train() puts the models it knows in train mode, not this one
        with torch.no_grad():
            return self.teacher_model(**inputs).logits

    def _topk_loss(self, outputs, cached, labels, shift_labels, num_items_in_batch):
        if any(c not in cached for c in TOPK_COLUMNS):
            raise ValueError(f"CSDTrainer(teacher_model=None) trains from the dataset's {TOPK_COLUMNS} columns, "
                             f"which this batch lacks (add them with add_teacher_topk)")
        ids, logprobs = (cached[c].to(outputs.logits.device) for c in TOPK_COLUMNS)
        keywords = dict(self.csd_loss_kwargs, tail=self.tail, num_items_in_batch=num_items_in_batch,
                        return_components=True)
        if shift_labels is None:
            return causal_lm_topk_csd_loss(outputs, ids, logprobs, labels, **keywords)
        return topk_csd_loss(outputs.logits, ids, logprobs, labels=shift_labels, **keywords)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)  # padding-free collators shift for us
        cached = {c: inputs.pop(c) for c in TOPK_COLUMNS if c in inputs}
        if self.fused_linear:
            loss, csd, ce, outputs = self._fused_linear_loss(model, inputs, labels, shift_labels, num_items_in_batch)
            loss, csd, ce = self._scale_and_record(model, loss, csd, ce, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        outputs = model(**inputs)
        if self.teacher_model is None:
            loss, csd, ce = self._topk_loss(outputs, cached, labels, shift_labels, num_items_in_batch)
        else:
            loss, csd, ce = self._dense_loss(outputs, inputs, labels, shift_labels, num_items_in_batch)
        loss, csd, ce = self._scale_and_record(model, loss, csd, ce, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _dense_loss(self, outputs, inputs, labels, shift_labels, num_items_in_batch):
        teacher_logits = self._teacher_logits(inputs, outputs.logits.device)
        if shift_labels is None:
            loss, csd, ce = causal_lm_csd_loss(outputs, teacher_logits, labels,
                                               num_items_in_batch=num_items_in_batch, return_components=True,
                                               **self.csd_loss_kwargs)
        else:
            vocab = min(outputs.logits.shape[-1], teacher_logits.shape[-1])
            loss, csd, ce = csd_loss(outputs.logits[..., :vocab], teacher_logits, labels=shift_labels,
                                     num_items_in_batch=num_items_in_batch, return_components=True,
                                     **self.csd_loss_kwargs)
        return loss, csd, ce

    def _fused_linear_loss(self, model, inputs, labels, shift_labels, num_items_in_batch):
        return fused_linear_causal_lm_loss(model, self.accelerator.unwrap_model(model), self.teacher_model, inputs,
                                           labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                                           **self.csd_loss_kwargs)

    def _scale_and_record(self, model, loss, csd, ce, num_items_in_batch):
        if (getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None
                and self.accelerator.num_processes > 1):
            # As Trainer.compute_loss: the gradients are averaged over processes, while num_items_in_batch
            # counts the tokens of all of them.
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp_size
            loss, csd, ce = loss * scale, csd * scale, ce * scale
        if model.training:
            sums = self._component_sums
            sums["csd"] = sums["csd"] + csd.detach()  # tensors: no host sync until logging
            sums["ce"] = sums["ce"] + ce.detach()
            sums["count"] += 1
        return loss, csd, ce

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        sums = self._component_sums
        if sums["count"] and "loss" in logs:
            # Components of the micro-batches since the last log; with num_items_in_batch each is a share
            # of its accumulated batch, so scale to the number of optimizer steps they span.
            steps = max(1, sums["count"] / max(1, self.args.gradient_accumulation_steps))
            logs["csd"] = round(float(sums["csd"]) / steps, 6)
            logs["ce"] = round(float(sums["ce"]) / steps, 6)
            self._component_sums = {"csd": 0.0, "ce": 0.0, "count": 0}
        super().log(logs, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Offline top-k distillation: the teacher's cache as dataset columns
# ----------------------------------------------------------------------------------------------------
LOGPROB_STORAGE = ("float16", "float32")


def add_teacher_topk(dataset, teacher_model: torch.nn.Module, k: int, *, batch_size: int = 16,
                     temperature: float = 1.0, logprobs_dtype: str = "float32", device=None,
                     desc: str = "teacher top-k"):
    """Run the teacher over a `datasets.Dataset` once and add its top-k as two columns.

    Each example's `input_ids` (and `attention_mask`, if present) go through the teacher in batches of
    `batch_size` (right-padded, which leaves a causal model's real positions unchanged); the new columns,
    aligned with input_ids as the teacher's logits are, hold (L, K) values per example:

        teacher_ids       int32, the top k ids of each position
        teacher_logprobs  float32 (default) or float16, log_softmax(logits / temperature) at those ids

    Storage (benchmarks/results/topk_storage.csv): float16 logprobs save 2 of 8 bytes per entry and move
    the loss by about 3e-4 relative (median; at most 2e-3) from float32 storage; bfloat16 would cost
    about 8x that, so it is not offered. Shows `datasets`' progress bar.
    Returns the new dataset (datasets are immutable); train on it with CSDTrainer(teacher_model=None).
    """
    import datasets

    from ..contract import check_k

    if logprobs_dtype not in LOGPROB_STORAGE:
        raise ValueError(f"logprobs_dtype must be one of {LOGPROB_STORAGE}, got {logprobs_dtype!r}")
    vocab = teacher_model.get_output_embeddings().weight.shape[0] if hasattr(
        teacher_model, "get_output_embeddings") and teacher_model.get_output_embeddings() is not None else None
    if vocab is not None:
        check_k(k, vocab)
    device = torch.device(device) if device is not None else next(teacher_model.parameters()).device
    was_training = teacher_model.training
    teacher_model.eval()
    store = getattr(torch, logprobs_dtype)

    def cache(batch):
        rows = [torch.as_tensor(x) for x in batch["input_ids"]]
        lengths = [len(x) for x in rows]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = torch.as_tensor(batch["attention_mask"][i]) if "attention_mask" in batch else 1
        with torch.no_grad():
            logits = teacher_model(input_ids=ids, attention_mask=mask).logits
            top_ids, top_logprobs = teacher_topk(logits, k, temperature=temperature)
        top_ids, top_logprobs = top_ids.to(torch.int32).cpu(), top_logprobs.to(store).cpu()
        return {"teacher_ids": [top_ids[i, :n].numpy() for i, n in enumerate(lengths)],
                "teacher_logprobs": [top_logprobs[i, :n].numpy() for i, n in enumerate(lengths)]}

    features = dataset.features.copy()
    features["teacher_ids"] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    features["teacher_logprobs"] = datasets.Sequence(datasets.Sequence(datasets.Value(logprobs_dtype)))
    try:
        return dataset.map(cache, batched=True, batch_size=batch_size, features=features, desc=desc)
    finally:
        teacher_model.train(was_training)


@dataclass
class TopKDataCollator:
    """Pad a list of examples with top-k columns into a batch: input_ids with `pad_token_id`,
    attention_mask with 0, labels with -100, teacher_ids with -1 and teacher_logprobs with -inf (padding
    in the sense of `topk_csd_loss`). Examples without labels get labels = input_ids (causal LM)."""

    pad_token_id: int = 0

    def __call__(self, examples: List[Mapping]) -> Dict[str, torch.Tensor]:
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100, "teacher_ids": -1,
                "teacher_logprobs": float("-inf")}
        examples = [dict(e) for e in examples]
        for e in examples:
            e.setdefault("labels", e["input_ids"])
            e.setdefault("attention_mask", [1] * len(e["input_ids"]))
        batch = {}
        for key in examples[0]:
            values = [torch.as_tensor(e[key]) for e in examples]
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pads.get(key, 0))
        return batch
