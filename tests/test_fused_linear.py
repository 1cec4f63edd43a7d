"""fused_linear_csd_loss against the unfused composition csd_loss(hidden @ W.T + b, teacher)."""

import sys

import pytest
import torch

from csd_kernels import csd_loss, fused_linear_csd_loss
from helpers import DEVICE, assert_close

N_LEAD, HIDDEN, VOCAB = (2, 7), 24, 300  # 14 rows: chunk sizes 1, 3 (does not divide 14), default


def make_inputs(dtype=torch.float32, teacher_as="logits", bias=True):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)  # noqa: E731
    inputs = {
        "student_hidden": rand(*N_LEAD, HIDDEN),
        "student_weight": rand(VOCAB, HIDDEN, scale=0.3),
        "student_bias": rand(VOCAB) if bias else None,
    }
    if teacher_as == "logits":
        inputs["teacher_logits"] = rand(*N_LEAD, VOCAB + 8, scale=2.0)  # padded teacher vocabulary
    else:
        inputs["teacher_hidden"] = rand(*N_LEAD, 40)  # H_t != H_s
        inputs["teacher_weight"] = rand(VOCAB + 8, 40, scale=0.3)
        inputs["teacher_bias"] = rand(VOCAB + 8)
    return inputs


def postprocessed(z, scale=1.0, softcap=None):
    """The output head's post-processing, written plainly: softcap * tanh(scale * z / softcap)."""
    z = scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def unfused(inputs, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0, teacher_softcap=None, **kwargs):
    """The composition in fp32 from the same inputs: the reference fused-linear must match."""
    f = lambda x: x.float() if x is not None else None  # noqa: E731
    logits = f(inputs["student_hidden"]) @ f(inputs["student_weight"]).t()
    if inputs["student_bias"] is not None:
        logits = logits + f(inputs["student_bias"])
    logits = postprocessed(logits, logit_scale, softcap)
    teacher = inputs.get("teacher_logits")
    if teacher is None:
        teacher = f(inputs["teacher_hidden"]) @ f(inputs["teacher_weight"]).t() + f(inputs["teacher_bias"])
        teacher = postprocessed(teacher, teacher_logit_scale, teacher_softcap)
    return csd_loss(logits, teacher.float(), backend="torch", **kwargs)


def grads_of(fn, inputs, upstream_seed=1, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()
              if k.startswith("student") and v is not None}
    loss = fn({**inputs, **leaves}, **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(DEVICE)
    grads = torch.autograd.grad(loss, list(leaves.values()), upstream)
    return loss.detach(), dict(zip(leaves, grads))


def check(inputs, dtype_of_grads=None, chunk_size=None, backend="torch", **kwargs):
    fused = lambda x, **k: fused_linear_csd_loss(**x, chunk_size=chunk_size, backend=backend, **k)  # noqa: E731
    loss, grads = grads_of(fused, inputs, **kwargs)
    ref_loss, ref_grads = grads_of(unfused, inputs, **kwargs)
    assert_close(loss, ref_loss, dtype=torch.float32, name="fused-linear loss")
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype
        assert_close(grad, ref_grads[name], dtype=dtype_of_grads or grad.dtype, name=f"grad {name}")


@pytest.mark.parametrize("chunk_size", [1, 3, None], ids=["chunk1", "chunk3", "default"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parity_chunks_and_reductions(backend, chunk_size, reduction):
    labels = torch.randint(0, VOCAB, N_LEAD, device=DEVICE)
    labels[0, 3] = labels[1, 6] = -100
    check(make_inputs(), chunk_size=chunk_size, backend=backend, reduction=reduction, labels=labels,
          weighting="ts")


@pytest.mark.parametrize("weighting", ["ss", "us", ({"teacher": 0.15, "student": 0.85},) * 2],
                         ids=["ss", "us", "ts-mix"])
def test_parity_teacher_as_hidden_states(backend, weighting):
    check(make_inputs(teacher_as="hidden"), chunk_size=4, backend=backend, weighting=weighting,
          temperature=1.5)


def test_parity_with_ce_mask_and_num_items(backend):
    labels = torch.randint(0, VOCAB, N_LEAD, device=DEVICE)
    mask = torch.rand(N_LEAD, device=DEVICE) > 0.3
    check(make_inputs(bias=False), chunk_size=5, backend=backend, labels=labels, mask=mask,
          ce_weight=0.5, num_items_in_batch=torch.tensor(9, device=DEVICE))


def test_bf16_inputs_keep_fp32_logits(backend):
    """bf16 hidden and weight: the logits stay fp32 until the loss reads them, so the result is the
    fp32 composition's up to bf16 rounding of the returned gradients."""
    check(make_inputs(dtype=torch.bfloat16), dtype_of_grads=torch.bfloat16, chunk_size=4, backend=backend)


POST = {
    "scale": dict(logit_scale=0.35),  # Cohere-style multiplier
    "softcap": dict(softcap=2.5),  # Gemma-2-style cap, tight enough that tanh bends the logits
    "scale+softcap": dict(logit_scale=1.7, softcap=3.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("post", list(POST))
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_parity_with_logit_postprocessing(backend, post, teacher_as, dtype):
    """logit_scale and softcap on the student (and on a teacher given as hidden states): value and every
    gradient of the materialised composition, with CE and a reduction="none" upstream."""
    kwargs = dict(POST[post])
    if teacher_as == "hidden":
        kwargs.update(teacher_logit_scale=0.8, teacher_softcap=4.0)
    labels = torch.randint(0, VOCAB, N_LEAD, device=DEVICE)
    labels[1, 2] = -100
    for reduction in ("mean", "none"):
        check(make_inputs(dtype=dtype, teacher_as=teacher_as), dtype_of_grads=dtype, chunk_size=4, backend=backend,
              weighting="ts", labels=labels, ce_weight=0.3, reduction=reduction, **kwargs)


def test_postprocessing_validation():
    inputs = make_inputs()
    for kwargs, error, message in [
        (dict(logit_scale=float("nan")), ValueError, "logit_scale must be finite"),
        (dict(logit_scale="2"), TypeError, "logit_scale must be a Python real number"),
        (dict(softcap=0.0), ValueError, "softcap must be finite and > 0, got 0.0"),
        (dict(softcap=True), TypeError, "softcap must be None or a Python real number"),
        (dict(teacher_softcap=30.0), ValueError, "apply to a teacher given as hidden states"),
    ]:
        with pytest.raises(error, match=message):
            fused_linear_csd_loss(**inputs, **kwargs)


def test_compact_rows_false_gives_the_same(backend):
    inputs = make_inputs()
    labels = torch.randint(0, VOCAB, N_LEAD, device=DEVICE)
    labels[0, :4] = -100
    a = fused_linear_csd_loss(**inputs, labels=labels, backend=backend, chunk_size=3)
    b = fused_linear_csd_loss(**inputs, labels=labels, backend=backend, chunk_size=3, compact_rows=False)
    assert_close(a, b)


def test_teacher_gets_no_gradient():
    inputs = make_inputs(teacher_as="hidden")
    for k in ("teacher_hidden", "teacher_weight"):
        inputs[k].requires_grad_(True)
    inputs["student_hidden"].requires_grad_(True)
    fused_linear_csd_loss(**inputs).backward()
    assert inputs["teacher_hidden"].grad is None and inputs["teacher_weight"].grad is None
    assert inputs["student_hidden"].grad is not None


def test_bad_input():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="either as teacher_logits or as teacher_hidden"):
        fused_linear_csd_loss(inputs["student_hidden"], inputs["student_weight"])
    with pytest.raises(ValueError, match=r"student_weight must be \(V_s, H_s=24\)"):
        fused_linear_csd_loss(inputs["student_hidden"], inputs["student_weight"][:, :5], inputs["teacher_logits"])
    with pytest.raises(ValueError, match="V_t=10 < V_s=300"):
        fused_linear_csd_loss(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_logits"][..., :10])
    with pytest.raises(TypeError, match="unsupported keyword argument"):
        fused_linear_csd_loss(**inputs, inplace_backward=True)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_csd_loss(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="student_bias must be a \\(300,\\) tensor"):
        fused_linear_csd_loss(**{**inputs, "student_bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_csd_loss(**inputs, reduction="avg")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory_below_unfused():
    """The fused path never holds the N x V logits or their gradient: it saves at least one of them."""
    from benchmarks.cpu_memory import measure

    rows, vocab, hidden = 2048, 32000, 256
    fused = measure("fused-linear-csd", rows, vocab, hidden=hidden)
    naive = measure("linear-then-csd", rows, vocab, hidden=hidden)
    logits_bytes = rows * vocab * 4
    assert fused["extra_bytes"] + logits_bytes < naive["extra_bytes"], (fused, naive)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_components(backend, reduction):
    inputs = make_inputs()
    inputs["student_hidden"].requires_grad_(True)
    labels = torch.randint(0, VOCAB, N_LEAD, device=DEVICE)
    labels[0, 0] = -100
    kwargs = dict(labels=labels, ce_weight=0.4, csd_weight=0.7, reduction=reduction, weighting="ts")
    total, csd, ce = fused_linear_csd_loss(**inputs, backend=backend, chunk_size=3, return_components=True, **kwargs)
    want = unfused(inputs, return_components=True, **kwargs)
    for got, ref, name in zip((total, csd, ce), want, ("total", "csd", "ce")):
        assert_close(got, ref, name=name)
    assert total.requires_grad and not csd.requires_grad and not ce.requires_grad
