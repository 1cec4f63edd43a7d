"""The `csd_loss` contract: argument validation and the weighting parser.

Everything here runs on the host before any kernel is launched and only looks at shapes, dtypes,
devices and Python values, never at tensor contents, so it costs no device synchronisation.

A weighting is a pair (w1, w2) of convex mixtures of three base distributions over the vocabulary:
S = softmax(s / temperature) (student), T = softmax(t / teacher_temperature) (teacher) and U (uniform
over the row's valid entries). It is stored as two coefficient triples in the order (S, T, U).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

import torch

BASES = ("student", "teacher", "uniform")
_LETTERS = {"s": "student", "t": "teacher", "u": "uniform"}
WEIGHTING_CODES = ("ss", "ts", "st", "us", "su", "tt", "uu", "tu", "ut")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "inductor")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Mixture coefficients must sum to one; this slack absorbs decimal inputs such as 0.15 + 0.85.
_SUM_TOLERANCE = 1e-6

Mixture = Tuple[float, float, float]


KINDS = ("csd", "kl-forward", "kl-reverse")


@dataclass(frozen=True)
class LossSpec:
    """What a backend needs to know about one call, besides the tensors.

    Every loss is a function of the same streamed row statistics (`kernels/stats.py`): CSD of the
    moments under (w1, w2); the KL divergences of the log-normalisers and E_S[d], E_T[d], which is why
    KL is posed as w1 = S, w2 = T with one temperature on both sides (see `kl_spec`).
    """

    w1: Mixture
    w2: Mixture
    temperature: float
    teacher_temperature: float
    kind: str = "csd"
    csd_weight: float = 1.0  # total = csd_weight * CSD + ce_weight * CE (hard-label cross-entropy)
    ce_weight: float = 0.0

    @property
    def has_ce(self) -> bool:
        return self.ce_weight > 0.0

    @property
    def kind_code(self) -> int:
        """The kernels' LOSS constexpr: 0 CSD, 1 forward KL, 2 reverse KL."""
        return KINDS.index(self.kind)

    def needs(self, base: int) -> bool:
        """Whether base distribution `base` (0 = S, 1 = T, 2 = U) carries any weight."""
        return self.w1[base] > 0.0 or self.w2[base] > 0.0

    @property
    def lead_base(self) -> int:
        """The base carrying most of w1 (0 = S, 1 = T, 2 = U): the streaming pass takes its first shift
        at that base's mode (stats.py)."""
        return max(range(3), key=lambda b: self.w1[b])

    @property
    def need_student(self) -> bool:
        return self.needs(0)

    @property
    def need_teacher(self) -> bool:
        return self.needs(1)

    @property
    def need_uniform(self) -> bool:
        return self.needs(2)


def kl_spec(kind: str, temperature: float) -> LossSpec:
    """KL(T || S) (kind="forward") or KL(S || T) ("reverse"), both softened by `temperature`."""
    if kind not in ("forward", "reverse"):
        raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")
    return LossSpec((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), temperature, temperature, kind=f"kl-{kind}")


def _parse_mixture(item, position: str) -> Mixture:
    if isinstance(item, str):
        if item not in BASES:
            raise ValueError(
                f"weighting {position}: unknown distribution {item!r}; expected one of {BASES}"
            )
        return tuple(1.0 if name == item else 0.0 for name in BASES)
    if isinstance(item, Mapping):
        unknown = [key for key in item if key not in BASES]
        if unknown:
            raise ValueError(
                f"weighting {position}: unknown distribution(s) {unknown}; expected keys from {BASES}"
            )
        coeffs = []
        for name in BASES:
            value = item.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"weighting {position}: coefficient of {name!r} must be a real number, "
                    f"got {type(value).__name__}"
                )
            value = float(value)
            if not (0.0 <= value < math.inf):
                raise ValueError(
                    f"weighting {position}: coefficient of {name!r} must be finite and "
                    f"non-negative, got {value}"
                )
            coeffs.append(value)
        total = sum(coeffs)
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise ValueError(
                f"weighting {position}: mixture coefficients must sum to 1, got {dict(item)} "
                f"(sum {total})"
            )
        return tuple(c / total for c in coeffs)
    raise TypeError(
        f"weighting {position}: expected a distribution name or a dict of names to coefficients, "
        f"got {type(item).__name__}"
    )


def parse_weighting(weighting) -> Tuple[Mixture, Mixture]:
    """Turn a weighting code or (w1, w2) pair into two (S, T, U) coefficient triples.

    >>> parse_weighting("ts")
    ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    >>> parse_weighting(({"teacher": 0.15, "student": 0.85},) * 2)[0]
    (0.85, 0.15, 0.0)
    """
    if isinstance(weighting, str):
        if weighting not in WEIGHTING_CODES:
            raise ValueError(
                f"weighting: unknown code {weighting!r}; expected one of {WEIGHTING_CODES} or a "
                f"(w1, w2) tuple"
            )
        return tuple(_parse_mixture(_LETTERS[letter], f"code {weighting!r}") for letter in weighting)
    if isinstance(weighting, (tuple, list)):
        if len(weighting) != 2:
            raise ValueError(f"weighting: a tuple must have two items (w1, w2), got {len(weighting)}")
        return _parse_mixture(weighting[0], "w1"), _parse_mixture(weighting[1], "w2")
    raise TypeError(f"weighting: expected a str code or a (w1, w2) tuple, got {type(weighting).__name__}")


# Accepted temperatures. The kernels multiply by log2(e) / temperature in fp32, so that reciprocal must be
# a normal, finite fp32 number with room to spare (fp32 spans about 1.2e-38 to 3.4e38).
TEMPERATURE_RANGE = (1e-30, 1e30)


def _check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons rather than math.isfinite, which torch.compile cannot trace; NaN fails both.
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    low, high = TEMPERATURE_RANGE
    if not (low <= value <= high):
        raise ValueError(
            f"{name} must lie in [{low:g}, {high:g}] (its reciprocal must be a finite fp32 number), got {value}"
        )
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_options(*, temperature=1.0, teacher_temperature=1.0, ignore_index=-100, reduction="mean",
                  backend="auto", num_items_in_batch=None, device=None) -> Tuple[float, float]:
    """The options every loss shares, checked without any tensor: also what the loss modules check at
    construction. Returns the two temperatures as floats."""
    temperature = _check_temperature("temperature", temperature)
    teacher_temperature = _check_temperature("teacher_temperature", teacher_temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_num_items(num_items_in_batch, device)
    return temperature, teacher_temperature


def check_logit_postprocessing(scale_name: str, scale, cap_name: str, cap) -> Tuple[float, Optional[float]]:
    """An output head's (logit_scale, softcap): a finite real multiplier, and None or a finite cap > 0."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{scale_name} must be a Python real number, got {type(scale).__name__}")
    if not (-math.inf < float(scale) < math.inf):
        raise ValueError(f"{scale_name} must be finite, got {scale}")
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
            raise TypeError(f"{cap_name} must be None or a Python real number, got {type(cap).__name__}")
        if not (0.0 < float(cap) < math.inf):
            raise ValueError(f"{cap_name} must be finite and > 0, got {cap}")
        cap = float(cap)
    return float(scale), cap


def check_loss_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python real number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int,
                          mask: Optional[torch.Tensor] = None) -> None:
    """The opt-in host check (`validate_labels=True`) of the counted positions' labels (those not equal
    to `ignore_index` and not excluded by `mask`): it synchronises with the device."""
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask
    counted = labels[counted]
    bad = counted[(counted < 0) | (counted >= vocab)]
    if bad.numel():
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; got "
            f"{bad.numel()} out of range, e.g. {bad[:5].tolist()}"
        )


def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor of dtype {LOGIT_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-dim tensor")


def _check_positions(name: str, x, lead: torch.Size, device: torch.device, want_bool: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if want_bool and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if not want_bool and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(lead):
        raise ValueError(
            f"{name} must have the logits' leading shape {tuple(lead)}, got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")


def check_inputs(
    student_logits,
    teacher_logits,
    *,
    temperature,
    teacher_temperature=1.0,
    labels=None,
    ignore_index=-100,
    mask=None,
    reduction="mean",
    num_items_in_batch=None,
    backend="auto",
) -> Tuple[float, float]:
    """Validate everything `csd_loss` and `kl_loss` share; returns the two temperatures as floats."""
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape[:-1] != t_shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have equal leading dims, got {s_shape} and {t_shape}"
        )
    if s_shape[-1] == 0:
        raise ValueError(f"student_logits has a zero-size vocabulary: shape {s_shape}")
    if t_shape[-1] < s_shape[-1]:
        raise ValueError(
            f"teacher vocabulary must be at least the student's (V_t >= V_s), got V_t={t_shape[-1]} "
            f"< V_s={s_shape[-1]} (shapes {t_shape} and {s_shape})"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    temperature, teacher_temperature = check_options(
        temperature=temperature, teacher_temperature=teacher_temperature, ignore_index=ignore_index,
        reduction=reduction, backend=backend, num_items_in_batch=num_items_in_batch,
        device=student_logits.device)
    lead = student_logits.shape[:-1]
    if labels is not None:
        _check_positions("labels", labels, lead, student_logits.device, want_bool=False)
    if mask is not None:
        _check_positions("mask", mask, lead, student_logits.device, want_bool=True)
    return temperature, teacher_temperature


def check_num_items(num_items_in_batch, device: Optional[torch.device]) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a 0-dim or one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be numeric, got {num_items_in_batch.dtype}")
        if device is not None and num_items_in_batch.device != device and num_items_in_batch.device.type != "cpu":
            raise ValueError(
                f"num_items_in_batch is on {num_items_in_batch.device} but the logits are on {device}"
            )
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(
            f"num_items_in_batch must be an int or a one-element tensor, got "
            f"{type(num_items_in_batch).__name__}"
        )
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")


def active_positions(
    lead: torch.Size,
    device: torch.device,
    labels: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    ignore_index: int,
) -> torch.Tensor:
    """(N,) bool: which positions count. Labels equal to `ignore_index` and False mask entries do not."""
    n = math.prod(lead)
    if labels is None and mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    active = None
    if labels is not None:
        active = labels.reshape(n) != ignore_index
    if mask is not None:
        m = mask.reshape(n)
        active = m if active is None else active & m
    # Kernels index per-row tensors as `ptr + row`: a mask that is a strided or broadcast view (stride 0)
    # must not reach them as such. O(N) bytes at most.
    return active.contiguous()


def row_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels of any integer dtype and layout as the backends take them: (N,) int64, contiguous.

    (`gather` wants int64; kernels index `ptr + row`.) O(N) bytes, no host sync."""
    return labels.reshape(-1).to(torch.int64).contiguous()


def reduce_rows(
    row_loss: torch.Tensor,
    active: torch.Tensor,
    lead: torch.Size,
    reduction: str,
    num_items_in_batch: Union[None, int, float, torch.Tensor],
) -> torch.Tensor:
    """Apply `reduction` to per-position losses (already 0 at excluded positions), without a host sync."""
    if reduction == "none":
        return row_loss.view(lead)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(active, num_items_in_batch, total.dtype)


def mean_denominator(active: torch.Tensor, num_items_in_batch, dtype: torch.dtype):
    """The denominator of reduction="mean": `num_items_in_batch` if given, else the counted positions.

    A 0-dim tensor on the device (or a Python float for a Python number), without a host sync."""
    if num_items_in_batch is None:
        # clamp: an empty batch or all-excluded positions give exactly 0, not 0/0.
        return active.sum().clamp_min(1).to(dtype)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.reshape(()).to(device=active.device, dtype=dtype)
    return float(num_items_in_batch)


# ----------------------------------------------------------------------------------------------------
# Top-k teachers (topk.py): the teacher as (ids, log-probabilities) per position
# ----------------------------------------------------------------------------------------------------
def check_topk_inputs(student_logits, teacher_ids, teacher_logprobs) -> None:
    """Shapes, dtypes and devices of a top-k call: student (..., V), ids and logprobs (..., K), K >= 1."""
    _check_logits("student_logits", student_logits)
    if student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits has a zero-size vocabulary: shape {tuple(student_logits.shape)}")
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if not isinstance(teacher_logprobs, torch.Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got {type(teacher_logprobs).__name__}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {teacher_ids.dtype}")
    if teacher_logprobs.dtype not in LOGIT_DTYPES:
        raise TypeError(f"teacher_logprobs must be a floating tensor of dtype {LOGIT_DTYPES}, got "
                        f"{teacher_logprobs.dtype}")
    if tuple(teacher_ids.shape) != tuple(teacher_logprobs.shape):
        raise ValueError(f"teacher_ids and teacher_logprobs must have the same shape, got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}")
    lead = tuple(student_logits.shape[:-1])
    if teacher_ids.dim() < 1 or tuple(teacher_ids.shape[:-1]) != lead:
        raise ValueError(f"teacher_ids must have shape (..., K) with the student's leading shape {lead}, got "
                         f"{tuple(teacher_ids.shape)} (student_logits {tuple(student_logits.shape)})")
    if teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids needs at least one entry per position (K >= 1), got shape "
                         f"{tuple(teacher_ids.shape)}")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != student_logits.device:
            raise ValueError(f"{name} is on {x.device} but student_logits is on {student_logits.device}")


def check_topk_ids(teacher_ids, teacher_logprobs, vocab: int) -> None:
    """The opt-in host check (`validate_ids=True`): every real id (id >= 0 and logprob > -inf) lies in
    [0, vocab) and no row repeats one. It synchronises with the device."""
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).to(torch.int64)
    real = (ids >= 0) & (teacher_logprobs.reshape(ids.shape) != -math.inf)
    bad = ids[real & (ids >= vocab)]
    if bad.numel():
        raise ValueError(f"teacher_ids must be < V = {vocab} (or negative for padding); got {bad.numel()} "
                         f"out of range, e.g. {bad[:5].tolist()}")
    # Sort each row's real ids (padding mapped to distinct negative values) and compare neighbours.
    keyed = torch.where(real, ids, -1 - torch.arange(ids.shape[-1], device=ids.device))
    ordered = keyed.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(dim=-1).nonzero()[0])
        value = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(f"teacher_ids repeats id {value} in position {row} (flattened); duplicate ids in a "
                         f"row are not allowed")


def check_k(k, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, V] = [1, {vocab}], got {k}")
    return int(k)
