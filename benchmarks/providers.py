"""The implementations the benchmarks compare, by name: each maps (student, teacher) to a scalar loss.

Names are stable: they are the `provider` column of the CSV and the legend of the plots.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import reference
import csd_kernels


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    make: Callable[[], Callable]  # built lazily: torch.compile and optional imports cost time
    gpu_only: bool = False
    requires: Optional[str] = None  # an optional module that must be importable

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if self.gpu_only and device.type != "cuda":
            return "GPU only"
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed"
        return None


def _naive_forward_kl(student, teacher):
    """What most training code does: fp32 log_softmax of both sides, then a batch-mean KL."""
    log_p_s = torch.log_softmax(student.float(), dim=-1)
    log_p_t = torch.log_softmax(teacher.float(), dim=-1)
    return torch.nn.functional.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def _liger_jsd():
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=0.0)  # beta = 0: forward KL(teacher || student), fed log-probabilities

    def loss(student, teacher):
        return jsd(torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1))

    return loss


def _with_labels(loss):
    """Give a loss of (student, teacher, labels) the providers' (student, teacher) signature.

    The labels (random, fixed per shape) are made once, outside the timed calls."""
    cache = {}

    def call(student, teacher):
        key = (tuple(student.shape), student.device)
        if key not in cache:
            gen = torch.Generator(device=student.device).manual_seed(1)
            cache[key] = torch.randint(0, student.shape[-1], student.shape[:-1], device=student.device,
                                       generator=gen)
        return loss(student, teacher, cache[key])

    return call


def _fused_ce(student, teacher, labels):
    return csd_kernels.csd_loss(student, teacher, labels=labels, ce_weight=1.0)


def _separate_ce(student, teacher, labels):
    """CSD, then the usual separate cross-entropy pass over the student logits."""
    vocab = student.shape[-1]
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, vocab), labels.reshape(-1))
    return csd_kernels.csd_loss(student, teacher, labels=labels) + ce


def _compiled(fn):
    """torch.compile, specialised per shape as a tuned training run would be.

    Dynamo keeps 8 compiled versions per function by default and then silently runs eager: the suite's
    40 shapes x 2 dtypes would be timed as "compiled" while running eager. Raise the limit, and make
    hitting it an error (recorded as such) rather than a silent fallback."""
    import torch._dynamo.config as dynamo

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096),
                        ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True)):
        if hasattr(dynamo, name):
            setattr(dynamo, name, value)
    return torch.compile(fn, dynamic=False)


def _csd(weighting):
    return lambda: functools.partial(csd_kernels.csd_loss, weighting=weighting)


def _kl(kind):
    return lambda: functools.partial(csd_kernels.kl_loss, kind=kind)


# Top-k providers ("topk<K>-..."): their inputs are (student, teacher_ids, teacher_logprobs), the cache
# built from the teacher's logits before anything is timed or measured (`topk_inputs`).
_TOPK_NAME = re.compile(r"^topk(\d+)-")


def topk_size(name: str) -> Optional[int]:
    """K of a top-k provider's teacher cache, None for the dense providers."""
    match = _TOPK_NAME.match(name)
    return int(match.group(1)) if match else None


def topk_inputs(student, teacher, k):
    """(student, ids int32, logprobs float32): the cache format of the README."""
    ids, logprobs = csd_kernels.teacher_topk(teacher, k)
    return student, ids.to(torch.int32), logprobs


def _topk(loss, **keywords):
    return lambda: functools.partial(loss, **keywords)


PROVIDERS = {
    p.name: p
    for p in [
        Provider("csd-ss", "csd_kernels.csd_loss, weighting='ss'", _csd("ss")),
        Provider("csd-ts", "csd_kernels.csd_loss, weighting='ts'", _csd("ts")),
        Provider("csd-us", "csd_kernels.csd_loss, weighting='us'", _csd("us")),
        Provider("csd-mix", "csd_kernels.csd_loss, weighting=(0.5 S + 0.5 T, S): a mixture of two softmaxes",
                 _csd(({"student": 0.5, "teacher": 0.5}, "student"))),
        Provider("csd-ss-chunked", "csd_kernels.csd_loss, weighting='ss', backend='torch' (the chunked PyTorch "
                 "backend, which 'auto' picks on a CPU below 2^20 logits)",
                 lambda: functools.partial(csd_kernels.csd_loss, weighting="ss", backend="torch")),
        Provider("kl-forward", "csd_kernels.kl_loss, kind='forward'", _kl("forward")),
        Provider("kl-reverse", "csd_kernels.kl_loss, kind='reverse'", _kl("reverse")),
        Provider("csd-ss+ce", "csd_loss with the cross-entropy fused in (ce_weight=1)",
                 lambda: _with_labels(_fused_ce)),
        Provider("csd-ss+separate-ce", "csd_loss plus a separate F.cross_entropy",
                 lambda: _with_labels(_separate_ce)),
        Provider("authors-csd", "naive PyTorch CSD in the authors' style (reference.csd_loss_authors)",
                 lambda: reference.csd_loss_authors),
        Provider("compiled-authors-csd", "torch.compile of authors-csd",
                 lambda: _compiled(reference.csd_loss_authors)),
        Provider("naive-kl", "naive PyTorch forward KL (fp32 log_softmax + kl_div)",
                 lambda: _naive_forward_kl),
        Provider("compiled-naive-kl", "torch.compile of naive-kl (Inductor's C++ code on a CPU)",
                 lambda: _compiled(_naive_forward_kl)),
        Provider("liger-jsd", "Liger-Kernel JSD, beta=0, fed log_softmax", _liger_jsd, gpu_only=True,
                 requires="liger_kernel"),
        Provider("topk8-csd-ss", "topk_csd_loss from a K=8 teacher cache (tail bucket)",
                 _topk(csd_kernels.topk_csd_loss)),
        Provider("topk64-csd-ss", "topk_csd_loss from a K=64 teacher cache (tail bucket)",
                 _topk(csd_kernels.topk_csd_loss)),
        Provider("topk512-csd-ss", "topk_csd_loss from a K=512 teacher cache (tail bucket)",
                 _topk(csd_kernels.topk_csd_loss)),
        Provider("topk64-csd-ss-notail", "topk_csd_loss, K=64, tail=False (the support alone)",
                 _topk(csd_kernels.topk_csd_loss, tail=False)),
        Provider("topk64-kl-forward", "topk_kl_loss, K=64, forward KL of the coarsened rows",
                 _topk(csd_kernels.topk_kl_loss)),
    ]
}


# Fused-linear providers: (hidden (N, H), weight (V, H), teacher_logits (N, V)) -> loss.
def _linear_then_csd(hidden, weight, teacher_logits):
    return csd_kernels.csd_loss(hidden @ weight.t(), teacher_logits)


def _fused_linear_csd(hidden, weight, teacher_logits):
    return csd_kernels.fused_linear_csd_loss(hidden, weight, teacher_logits)


def _linear_only(hidden, weight, teacher_logits):
    """The GEMMs alone (forward + two backward): the floor of any fused-linear loss."""
    return (hidden @ weight.t()).sum()


LINEAR_PROVIDERS = {
    "fused-linear-csd": _fused_linear_csd,
    "linear-then-csd": _linear_then_csd,
    "linear-only": _linear_only,
}
