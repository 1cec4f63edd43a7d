"""Bad input fails before any work with a ValueError/TypeError that names the argument and the values."""

import math

import pytest
import torch

from csd_kernels import CSDLoss, KLLoss, csd_loss, fused_linear_csd_loss, kl_loss
from csd_kernels.contract import parse_weighting


def logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


S, T = logits(2, 3, 10), logits(2, 3, 10)

CASES = [
    # (description, call, exception, message fragment)
    ("student not a tensor", lambda: csd_loss([1.0], T), TypeError, "student_logits must be a torch.Tensor"),
    ("integer teacher", lambda: csd_loss(S, torch.ones(2, 3, 10, dtype=torch.int64)), TypeError,
     "teacher_logits must be a floating tensor"),
    ("0-dim logits", lambda: csd_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "vocabulary dimension"),
    ("leading dims differ", lambda: csd_loss(S, logits(3, 2, 10)), ValueError,
     "equal leading dims, got (2, 3, 10) and (3, 2, 10)"),
    ("teacher vocabulary smaller", lambda: csd_loss(S, logits(2, 3, 9)), ValueError, "V_t=9 < V_s=10"),
    ("zero vocabulary", lambda: csd_loss(logits(2, 0), logits(2, 0)), ValueError, "zero-size vocabulary"),
    ("unknown weighting code", lambda: csd_loss(S, T, weighting="sx"), ValueError, "unknown code 'sx'"),
    ("unknown distribution", lambda: csd_loss(S, T, weighting=("student", "prior")), ValueError,
     "unknown distribution 'prior'"),
    ("weighting of three", lambda: csd_loss(S, T, weighting=("student",) * 3), ValueError, "two items"),
    ("weighting wrong type", lambda: csd_loss(S, T, weighting=3), TypeError, "weighting: expected"),
    ("negative coefficient", lambda: csd_loss(S, T, weighting=({"student": 1.5, "teacher": -0.5}, "student")),
     ValueError, "coefficient of 'teacher' must be finite and non-negative, got -0.5"),
    ("coefficients not summing to 1", lambda: csd_loss(S, T, weighting=({"student": 0.5, "teacher": 0.4}, "student")),
     ValueError, "must sum to 1"),
    ("unknown mixture key", lambda: csd_loss(S, T, weighting=({"prior": 1.0}, "student")), ValueError,
     "unknown distribution(s) ['prior']"),
    ("zero temperature", lambda: csd_loss(S, T, temperature=0.0), ValueError, "temperature must be finite and > 0, got 0.0"),
    ("infinite teacher temperature", lambda: csd_loss(S, T, teacher_temperature=math.inf), ValueError,
     "teacher_temperature must be finite and > 0, got inf"),
    ("tensor temperature", lambda: csd_loss(S, T, temperature=torch.tensor(2.0)), TypeError,
     "temperature must be a Python real number"),
    ("labels wrong shape", lambda: csd_loss(S, T, labels=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     "labels must have the logits' leading shape (2, 3), got (2, 4)"),
    ("float labels", lambda: csd_loss(S, T, labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
    ("mask not bool", lambda: csd_loss(S, T, mask=torch.ones(2, 3, dtype=torch.long)), TypeError,
     "mask must be a bool tensor"),
    ("mask wrong shape", lambda: csd_loss(S, T, mask=torch.ones(6, dtype=torch.bool)), ValueError,
     "mask must have the logits' leading shape (2, 3), got (6,)"),
    ("unknown reduction", lambda: csd_loss(S, T, reduction="batchmean"), ValueError, "reduction must be one of"),
    ("unknown backend", lambda: csd_loss(S, T, backend="cuda"), ValueError, "backend must be one of"),
    ("num_items zero", lambda: csd_loss(S, T, num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0, got 0"),
    ("num_items vector", lambda: csd_loss(S, T, num_items_in_batch=torch.ones(2)), ValueError,
     "0-dim or one-element tensor"),
    ("num_items string", lambda: csd_loss(S, T, num_items_in_batch="4"), TypeError, "num_items_in_batch must be"),
    ("ignore_index float", lambda: csd_loss(S, T, ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("inplace_backward not bool", lambda: csd_loss(S, T, inplace_backward=1), TypeError, "inplace_backward must be a bool"),
    ("float64 with triton", lambda: csd_loss(S.double(), T, backend="triton"), TypeError,
     "does not take float64"),
    ("module keyword typo", lambda: CSDLoss(weightning="ss"), TypeError, "unknown keyword argument(s) ['weightning']"),
    ("module bad weighting", lambda: CSDLoss(weighting="xx"), ValueError, "unknown code 'xx'"),
    # temperatures whose reciprocal is not a finite fp32 number
    ("tiny temperature", lambda: csd_loss(S, T, temperature=1e-300), ValueError,
     "temperature must lie in [1e-30, 1e+30] (its reciprocal must be a finite fp32 number), got 1e-300"),
    ("huge teacher temperature", lambda: csd_loss(S, T, teacher_temperature=1e300), ValueError,
     "teacher_temperature must lie in [1e-30, 1e+30]"),
    ("tiny kl temperature", lambda: kl_loss(S, T, temperature=1e-40), ValueError, "temperature must lie in"),
    ("inplace into a broadcast", lambda: csd_loss(S[:1].expand(2, 3, 10).requires_grad_(), T, inplace_backward=True),
     ValueError, "inplace_backward=True needs student_logits whose elements do not share memory"),
    ("fused-linear compact_rows", lambda: fused_linear_csd_loss(torch.randn(4, 3), torch.randn(10, 3),
                                                                torch.randn(4, 10), compact_rows=1),
     TypeError, "compact_rows must be a bool"),
]

# The modules check every argument when they are built, not at the first call.
MODULE_CASES = [
    (CSDLoss, dict(temperature=0.0), ValueError, "temperature must be finite and > 0, got 0.0"),
    (CSDLoss, dict(teacher_temperature=1e-300), ValueError, "teacher_temperature must lie in"),
    (CSDLoss, dict(reduction="avg"), ValueError, "reduction must be one of"),
    (CSDLoss, dict(backend="cuda"), ValueError, "backend must be one of"),
    (CSDLoss, dict(ce_weight=-1.0), ValueError, "ce_weight must be finite and >= 0, got -1.0"),
    (CSDLoss, dict(csd_weight="1"), TypeError, "csd_weight must be a Python real number"),
    (CSDLoss, dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (CSDLoss, dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
    (CSDLoss, dict(return_components=1), TypeError, "return_components must be a bool"),
    (CSDLoss, dict(validate_labels="yes"), TypeError, "validate_labels must be a bool"),
    (CSDLoss, dict(inplace_backward=None), TypeError, "inplace_backward must be a bool"),
    (CSDLoss, dict(labels=[1, 2]), TypeError, "labels must be a torch.Tensor"),
    (KLLoss, dict(kind="sideways"), ValueError, "kind must be 'forward' or 'reverse'"),
    (KLLoss, dict(temperature=-2.0), ValueError, "temperature must be finite and > 0"),
    (KLLoss, dict(temperature_squared=1), TypeError, "temperature_squared must be a bool"),
    (KLLoss, dict(reduction="batchmean"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("module, kwargs, exception, fragment", MODULE_CASES,
                         ids=[f"{m.__name__}-{next(iter(k))}" for m, k, _, _ in MODULE_CASES])
def test_modules_validate_at_construction(module, kwargs, exception, fragment):
    with pytest.raises(exception) as info:
        module(**kwargs)
    assert fragment in str(info.value)


def test_accepted_temperature_range_runs():
    for tau in (1e-30, 1e30):
        assert torch.isfinite(csd_loss(S, T, temperature=tau, teacher_temperature=tau, backend="torch"))


def test_validate_labels_checks_only_counted_positions():
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[0, 0] = 99  # out of range, but excluded by the mask
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    csd_loss(S, T, labels=labels, mask=mask, ce_weight=1.0, validate_labels=True)
    fused_linear_csd_loss(torch.randn(2, 3, 4), torch.randn(10, 4), T, labels=labels, mask=mask,
                          ce_weight=1.0, validate_labels=True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*e.g. \[99\]"):
        csd_loss(S, T, labels=labels, ce_weight=1.0, validate_labels=True)


@pytest.mark.parametrize("call, exception, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_a_clear_message(call, exception, fragment):
    with pytest.raises(exception) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices: CUDA and CPU")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="student_logits is on cuda"):
        csd_loss(S.cuda(), T)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors, got tensors on cpu"):
        csd_loss(S, T, backend="triton")


def test_validation_happens_before_any_work(monkeypatch):
    """A bad argument after good tensors must fail before a kernel module is even imported."""
    from csd_kernels import ops

    def boom(name):
        raise AssertionError("a backend was reached before validation finished")

    monkeypatch.setattr(ops, "backend_module", boom)
    with pytest.raises(ValueError, match="reduction"):
        csd_loss(S, T, reduction="avg")


def test_weighting_parser():
    assert parse_weighting("ss") == ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    assert parse_weighting("ts") == ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    assert parse_weighting("us") == ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    mix = parse_weighting(({"teacher": 0.15, "student": 0.85}, "uniform"))
    assert mix[0] == pytest.approx((0.85, 0.15, 0.0)) and mix[1] == (0.0, 0.0, 1.0)


def test_importing_the_package_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, csd_kernels; assert 'triton' not in sys.modules, 'triton imported'; " \
           "assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
