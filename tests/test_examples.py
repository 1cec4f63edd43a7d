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


def test_compare_losses_runs_and_reruns_identically(tmp_path):
    """A tiny budget of the tuned comparison, run twice, in one process and in two: the same table and CSV
    (each student run is single-threaded and seeded, so the result does not depend on --workers)."""
    import compare_losses

    tiny = ["--vocab", "64", "--teacher-steps", "4", "--steps", "4", "--lrs", "1e-2", "3e-2", "--seeds", "2",
            "--train-sequences", "48", "--eval-sequences", "16", "--batch-size", "8", "--seq-len", "12",
            "--width", "32", "--student-width", "8", "--curve-points", "2"]
    for workers in (1, 2):
        compare_losses.main(tiny + ["--workers", str(workers), "--out", str(tmp_path / f"w{workers}")])
    first, second = (tmp_path / "w1", tmp_path / "w2")
    table = (first / "compare_losses.md").read_text()
    assert table == (second / "compare_losses.md").read_text()
    assert (first / "compare_losses.csv").read_text() == (second / "compare_losses.csv").read_text()
    for method in compare_losses.METHODS:
        assert table.count(f"| {method} |") == 2  # the results table and the tuning table
    assert "| truth |" in table and "| teacher |" in table
    rows = (first / "compare_losses.csv").read_text().splitlines()
    assert len(rows) == 1 + len(compare_losses.METHODS) * (2 + 2 * 3)  # header, 2 tuning runs, 2 seeds x 3 points
    for name in ("compare_losses.png", "compare_losses_plane.png"):
        assert (first / name).stat().st_size > 10_000
