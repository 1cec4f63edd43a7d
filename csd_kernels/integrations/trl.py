"""TRL integration: `CSDDistillationTrainer`, on-policy distillation with CSD as the divergence.

    pip install -e ".[trl]"          # trl >= 1.16 (its `DistillationTrainer`)

`trl.DistillationTrainer` generates completions with the student (on-policy), runs both backbones for
their final hidden states on prompt + completion, and matches the teacher under a generalised JSD
projected chunk by chunk from the hidden states. This subclass keeps all of that (generation, tool
masks, the global count of completion tokens it normalises by, logging) and replaces only the divergence
with `fused_linear_csd_loss` on the same hidden states and output heads: every `csd_loss` weighting and
temperature, the fused cross-entropy on the completion tokens, and the heads' logit post-processing
(`logit_postprocessing`, the names TRL reads). `csd` and `ce` are logged beside TRL's metrics.

Configuration is TRL's way, a config dataclass: `CSDDistillationConfig` is `trl.DistillationConfig` plus
the loss fields (`beta` is unused: CSD replaces the JSD). Importing `csd_kernels` or its transformers
integration never imports TRL; importing this module does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import DistillationConfig, DistillationTrainer

from ..loss import CSDLoss
from .transformers import fused_head_loss


@dataclass
class CSDDistillationConfig(DistillationConfig):
    """`trl.DistillationConfig` plus the CSD loss (see `csd_kernels.csd_loss` for each field's meaning).

    `temperature` stays TRL's sampling temperature; `csd_temperature` (default: the same value, TRL's
    convention of one temperature for sampling and loss) softens the student weights S."""

    weighting: str = field(default="ss", metadata={"help": "CSD weighting code: ss, ts, st, us, su, tt, uu, tu, ut "
                                                   "(in Python, also a (w1, w2) tuple of mixtures)."})
    csd_temperature: Optional[float] = field(default=None, metadata={"help": "Temperature of S in CSD; None: "
                                                                     "`temperature`."})
    teacher_temperature: float = field(default=1.0, metadata={"help": "Temperature of T in CSD."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the cross-entropy on the completion tokens."})
    csd_weight: float = field(default=1.0, metadata={"help": "Weight of the CSD term."})
    csd_backend: str = field(default="auto", metadata={"help": "csd_kernels backend: auto, torch or triton."})

    def __post_init__(self):
        super().__post_init__()
        # Every loss field is checked now, not at the first training step.
        CSDLoss(weighting=self.weighting, temperature=self.loss_temperature,
                teacher_temperature=self.teacher_temperature, ce_weight=self.ce_weight, csd_weight=self.csd_weight,
                backend=self.csd_backend)

    @property
    def loss_temperature(self) -> float:
        return _loss_temperature(self)


def _loss_temperature(args) -> float:
    """CSD's student temperature: `csd_temperature`, or TRL's `temperature` (sampling and loss) if None."""
    return args.temperature if args.csd_temperature is None else args.csd_temperature


_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


class CSDDistillationTrainer(DistillationTrainer):
    """`trl.DistillationTrainer` with CSD (+ optional cross-entropy) as its loss; `args` a
    `CSDDistillationConfig` (a plain `DistillationConfig` gets the CSD defaults)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CSDDistillationConfig):
            defaults = CSDDistillationConfig.__dataclass_fields__
            for name in ("weighting", "csd_temperature", "teacher_temperature", "ce_weight", "csd_weight",
                         "csd_backend"):
                setattr(self.args, name, defaults[name].default)
        self._csd_parts = None

    def _loss_keywords(self):
        args = self.args
        return dict(weighting=args.weighting, temperature=_loss_temperature(args),
                    teacher_temperature=args.teacher_temperature,
                    ce_weight=args.ce_weight, csd_weight=args.csd_weight, backend=args.csd_backend)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """As TRL's `_compute_loss` (hidden states of both models on prompt + completion, aligned to the
        completion tokens), with `fused_linear_csd_loss` as the divergence. Returns TRL's triple (loss,
        entropy sum, valid-token count); the student entropy is not computed (NaN, which TRL's log skips)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher, input_ids,
                attention_mask, logits_to_keep, **multimodal)
        mask = loss_mask != 0
        loss, csd, ce = fused_head_loss(unwrapped_student, unwrapped_teacher, student_hidden, teacher_hidden,
                                        labels=inputs["completion_ids"], mask=mask,
                                        num_items_in_batch=num_items_in_batch, **self._loss_keywords())
        device = loss.device
        mask = mask.to(device)
        n_valid = mask.sum()
        # Components as sums over this micro-batch's valid tokens, for logging per-token means.
        denominator = n_valid.clamp(min=1) if num_items_in_batch is None else torch.as_tensor(
            num_items_in_batch, device=device)
        self._csd_parts = (csd * denominator, ce * denominator, n_valid)
        return loss, torch.full((), float("nan"), device=device), n_valid

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._csd_parts is not None:
            mode = "train" if self.model.training else "eval"
            csd_sum, ce_sum, n_valid = (self.accelerator.gather_for_metrics(x.detach().reshape(1)).sum()
                                        for x in self._csd_parts)
            count = n_valid.clamp(min=1)
            self._metrics[mode]["csd"].append((csd_sum / count).item())
            self._metrics[mode]["ce"].append((ce_sum / count).item())
            self._csd_parts = None
        return out
