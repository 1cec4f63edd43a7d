"""The example runs end to end (at a toy size here; its default size is documented in the README)."""

import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def test_distill_tiny_runs(tmp_path):
    import distill_tiny

    distill_tiny.main(["--vocab", "200", "--teacher-steps", "6", "--steps", "4", "--eval-every", "2",
                       "--train-sequences", "64", "--held-out-sequences", "16", "--batch-size", "8",
                       "--seq-len", "12", "--width", "32", "--out", str(tmp_path)])
    table = (tmp_path / "distill_tiny.md").read_text()
    for method in ("CSD ss", "CSD ts", "forward KL", "cross-entropy"):
        assert f"| {method} |" in table
    assert (tmp_path / "distill_tiny.png").stat().st_size > 10_000


def test_distill_topk_runs(tmp_path):
    import distill_topk

    distill_topk.main(["--vocab", "200", "--teacher-steps", "6", "--steps", "4", "--eval-every", "2",
                       "--train-sequences", "64", "--held-out-sequences", "16", "--batch-size", "8",
                       "--seq-len", "12", "--width", "32", "--out", str(tmp_path)])
    table = (tmp_path / "distill_topk.md").read_text()
    for method in distill_topk.METHODS:
        assert f"| {method} |" in table
    assert (tmp_path / "distill_topk.png").stat().st_size > 10_000
