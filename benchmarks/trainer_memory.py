"""Peak host memory of one CSDTrainer training step on CPU, with and without `fused_linear` (Linux).

    python -m benchmarks.trainer_memory --out benchmarks/results/trainer_memory.csv [--readme]

A shape where the logits dominate: V = 32000, a batch of 4 x 512 tokens, small Llama-style student and
teacher (1 layer, width 64). Each configuration runs in a fresh process (as benchmarks/cpu_memory.py):
models, batch and optimizer are built first, one warm-up step runs, then the kernel's high-water mark is
reset and one more step (compute_loss, backward, optimizer step) is measured. "extra" is VmHWM minus the
resident set just before that step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

from .cpu_memory import ROOT, _resident_bytes

SHAPE = dict(vocab=32000, batch=4, seq=512, width=64)


def _step(fused_linear: bool, shape: dict) -> dict:
    import tempfile

    import torch
    import transformers

    from csd_kernels.integrations.transformers import CSDTrainer

    torch.manual_seed(0)
    SHAPE = shape  # noqa: N806 (this process's shape)

    def model(seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["width"],
                                          intermediate_size=2 * SHAPE["width"], num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=SHAPE["seq"])
        return transformers.LlamaForCausalLM(config)

    student, teacher = model(0), model(1)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True,
                                          disable_tqdm=True, max_steps=1)
    trainer = CSDTrainer(model=student, args=args, teacher_model=teacher, backend="torch", weighting="ts",
                         ce_weight=0.5, fused_linear=fused_linear)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step():
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: the measured step reuses them
        return float(loss)

    step()  # warm-up: optimizer state, gradients, thread pools
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _resident_bytes("VmRSS")
    loss = step()
    extra = _resident_bytes("VmHWM") - before
    logits_bytes = SHAPE["batch"] * SHAPE["seq"] * SHAPE["vocab"] * 4
    return {"fused_linear": int(fused_linear), "extra_bytes": extra, "fp32_logits_bytes": logits_bytes,
            "loss": loss, **SHAPE}


def measure(fused_linear: bool, shape: dict = SHAPE) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "benchmarks.trainer_memory", "--one", "1" if fused_linear else "0",
           "--shape", json.dumps(shape)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows):
    by = {int(r["fused_linear"]): r for r in rows}
    mb = lambda r: f"{int(r['extra_bytes']) / 2**20:.0f} MiB"  # noqa: E731
    shape = rows[0]
    return (f"One `CSDTrainer` step on CPU (Llama-style student and teacher, 1 layer, width {shape['width']}, "
            f"V = {shape['vocab']}, batch {shape['batch']} x {shape['seq']} tokens; one fp32 logits tensor is "
            f"{int(shape['fp32_logits_bytes']) / 2**20:.0f} MiB): extra peak memory {mb(by[0])} with the default "
            f"logits path, {mb(by[1])} with `fused_linear=True` (`python -m benchmarks.trainer_memory`).\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/trainer_memory.csv")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--one", choices=["0", "1"], help=argparse.SUPPRESS)  # the measured child process
    parser.add_argument("--shape", default=json.dumps(SHAPE), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_step(args.one == "1", json.loads(args.shape))))
        return
    rows = [measure(False), measure(True)]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))
    if args.readme:
        from .plots import write_between_markers

        write_between_markers(os.path.join(ROOT, "README.md"), "trainer-memory", markdown(rows))


if __name__ == "__main__":
    main()
