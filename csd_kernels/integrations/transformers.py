"""transformers integration: `CSDTrainer` and the `causal_lm_csd_loss` helper for custom loops.

    pip install -e ".[hf]"

Importing `csd_kernels` never imports transformers; importing this module does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
from transformers import Trainer
from transformers import __version__ as transformers_version

from ..loss import CSDLoss, csd_loss

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


class CSDTrainer(Trainer):
    """A `transformers.Trainer` that distils a frozen teacher into the model with CSD.

    Both models run on each batch; the student is called without `labels` (so it does not compute a
    second, full cross-entropy), and the loss is `causal_lm_csd_loss` of its logits against the
    teacher's, normalised by the `num_items_in_batch` the Trainer counts over the whole accumulated
    batch, so gradient accumulation and multi-device token averaging give the same update as one big
    batch. The CSD and cross-entropy components are logged as `csd` and `ce`.

    Args:
        teacher_model: the teacher, moved to the student's device, put in eval mode and frozen.
        weighting, temperature, teacher_temperature, ce_weight, csd_weight, backend: as in `csd_loss`.
        Everything else goes to `transformers.Trainer`.
    """

    def __init__(self, *args, teacher_model: torch.nn.Module, weighting="ss", temperature: float = 1.0,
                 teacher_temperature: float = 1.0, ce_weight: float = 0.0, csd_weight: float = 1.0,
                 backend: str = "auto", **kwargs):
        if not hasattr(Trainer, "_get_num_items_in_batch"):
            raise ImportError("CSDTrainer needs transformers >= 4.57 (Trainer._get_num_items_in_batch), "
                              f"found {transformers_version}")
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        # Every loss argument is checked now, not at the first training step.
        CSDLoss(weighting=weighting, temperature=temperature, teacher_temperature=teacher_temperature,
                ce_weight=ce_weight, csd_weight=csd_weight, backend=backend)
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model
        self.teacher_model.eval()
        self.teacher_model.requires_grad_(False)
        self.csd_loss_kwargs: Dict[str, Any] = dict(
            weighting=weighting, temperature=temperature, teacher_temperature=teacher_temperature,
            ce_weight=ce_weight, csd_weight=csd_weight, backend=backend)
        # The loss below is normalised by num_items_in_batch: make the Trainer count it (over the
        # shifted labels, for causal LMs) and not divide the loss again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self._component_sums = {"csd": 0.0, "ce": 0.0, "count": 0}

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)  # padding-free collators shift for us
        outputs = model(**inputs)
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
        return (loss, outputs) if return_outputs else loss

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
