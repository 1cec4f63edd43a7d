"""Plots and a markdown table drawn from a benchmark CSV (never from numbers typed by hand).

Usage: python -m benchmarks.plots benchmarks/results/<run>/results.csv [--readme]
Writes time_vs_vocab.png, memory_vs_vocab.png and table.md beside the CSV; with --readme, also copies
the table into README.md between the markers <!-- results:<run> --> and <!-- /results:<run> -->.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict
from typing import Dict, List

_STYLE = {  # kernel providers solid, naive and compiled baselines dashed
    "csd-": "-", "kl-": "-", "authors": "--", "compiled": ":", "naive": "--", "liger": "-.",
}


def load(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ok(rows, metric, mode):
    """Rows of the logits providers (the fused-linear ones, with an H, have their own table)."""
    return [r for r in rows if r["metric"] == metric and r["mode"] == mode and r["status"] == "ok"
            and not r.get("H")]


def _linestyle(provider: str) -> str:
    return next((style for prefix, style in _STYLE.items() if provider.startswith(prefix)), "-")


def plot(rows, metric: str, mode: str, ylabel: str, scale: float, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    selected = _ok(rows, metric, mode)
    # Panels for the swept shapes only (a lone memory-only case, like the CPU memory target, is not one).
    swept = {(r["dtype"], int(r["N"])) for r in _ok(rows, "time", mode)}
    panels = sorted({(r["dtype"], int(r["N"])) for r in selected} & swept)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (dtype, n) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in selected:
            if r["dtype"] == dtype and int(r["N"]) == n:
                series[r["provider"]].append((int(r["V"]), float(r["p50"]) * scale))
        for provider, points in sorted(series.items()):
            points.sort()
            ax.plot([v for v, _ in points], [y for _, y in points], _linestyle(provider), marker="o",
                    markersize=3, label=provider)
        ax.set_xscale("log")
        ax.set_yscale("log")
        vocabs = sorted({v for points in series.values() for v, _ in points})
        ax.set_xticks(vocabs, [f"{v // 1000}k" if v >= 1000 else str(v) for v in vocabs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.set_title(f"N = {n}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
    labelled = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    axes[0][-1].legend(list(labelled.values()), list(labelled), fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{title} ({rows[0]['device']}, commit {rows[0]['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def table(rows, n: int) -> str:
    """Markdown: one line per (provider, V) at N = n: full-step time, extra memory, bandwidth."""
    cells = defaultdict(dict)
    for r in rows:
        if int(r["N"] or 0) != n or r["mode"] != "full" or r.get("H"):
            continue
        key = (r["dtype"], r["provider"], int(r["V"]))
        if r["status"] != "ok":
            cells[key]["status"] = r["status"]
        else:
            cells[key][r["metric"]] = float(r["p50"])
    if not cells:
        return ""
    lines = [
        f"Forward + backward at N = {n} on {rows[0]['device']} (commit {rows[0]['commit']}; median):",
        "",
        "| dtype | provider | V | time (ms) | extra memory (MB) | bandwidth (of copy) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (dtype, provider, vocab), c in sorted(cells.items()):
        def fmt(metric, scale=1.0, digits=2):
            return f"{c[metric] * scale:.{digits}f}" if metric in c else c.get("status", "")
        lines.append(
            f"| {dtype} | {provider} | {vocab} | {fmt('time')} | {fmt('extra_memory', 1e-6, 0)} | "
            f"{fmt('bandwidth_fraction', 100, 0) + ' %' if 'bandwidth_fraction' in c else '-'} |"
        )
    return "\n".join(lines) + "\n"


def linear_table(rows) -> str:
    """Markdown for the fused-linear cases: forward + backward time and extra memory."""
    cells = defaultdict(dict)
    for r in rows:
        if r.get("H") and r["mode"] == "full" and r["status"] == "ok":
            cells[(r["dtype"], r["N"], r["H"], r["V"], r["provider"])][r["metric"]] = float(r["p50"])
    if not cells:
        return ""
    lines = ["Fused-linear (hidden states in), forward + backward (median):", "",
             "| dtype | N | H | V | provider | time (ms) | extra memory (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (dtype, n, h, v, provider), c in sorted(cells.items()):
        memory = f"{c['extra_memory'] / 1e6:.0f}" if "extra_memory" in c else "-"
        lines.append(f"| {dtype} | {n} | {h} | {v} | {provider} | {c.get('time', float('nan')):.2f} | {memory} |")
    return "\n".join(lines) + "\n"


def render(path: str) -> List[str]:
    rows = load(path)
    folder = os.path.dirname(path)
    written = []
    for metric, label, scale, name, title in [
        ("time", "forward + backward time (ms)", 1.0, "time_vs_vocab.png", "Time"),
        ("extra_memory", "extra peak memory (MB)", 1e-6, "memory_vs_vocab.png", "Extra peak memory"),
    ]:
        out = os.path.join(folder, name)
        plot(rows, metric, "full", label, scale, out, title)
        if os.path.exists(out):
            written.append(out)
    md = table(rows, _table_rows(rows)) + "\n" + linear_table(rows)
    out = os.path.join(folder, "table.md")
    with open(out, "w") as f:
        f.write(md)
    written.append(out)
    return written


def memory_target_line(rows) -> str:
    """The foundation issue's CPU memory target, read from the CSV if the run measured it."""
    for r in rows:
        if (r["metric"] == "extra_memory_over_grad" and r["provider"] == "csd-ss" and r["N"] == "8192"
                and r["V"] == "32000" and r["dtype"] == "float32" and r["status"] == "ok"):
            extra = next(float(x["p50"]) for x in rows if x["metric"] == "extra_memory"
                         and x["provider"] == "csd-ss" and x["N"] == "8192" and x["V"] == "32000")
            return (f"`csd_loss` (\"auto\": the compiled CPU backend) forward + backward at (8192, 32000) fp32 on "
                    f"{r['device']}: {extra / 1e6:.0f} MB extra peak memory, {float(r['p50']):.2f}x "
                    f"the size of its gradient (target: below 1.5x).\n")
    return ""


def write_between_markers(readme: str, key: str, body: str) -> None:
    """Replace what README.md holds between <!-- key --> and <!-- /key --> with `body`."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = open(readme).read()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{begin}\n{body}{end}{tail}")


def update_readme(csv_path: str, readme: str) -> None:
    run = os.path.basename(os.path.dirname(os.path.abspath(csv_path)))
    rows = load(csv_path)
    body = table(rows, _table_rows(rows)) + "\n" + linear_table(rows) + "\n" + memory_target_line(rows)
    write_between_markers(readme, f"results:{run}", body)


def _table_rows(rows, preferred=8192) -> int:
    sizes = sorted({int(r["N"]) for r in rows if r["N"] and int(r["N"]) > 0
                    and r["metric"] == "time" and not r.get("H")})
    return preferred if preferred in sizes else max(sizes, default=0)


if __name__ == "__main__":
    for written in render(sys.argv[1]):
        print("wrote", written)
    if "--readme" in sys.argv[2:]:
        update_readme(sys.argv[1], os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
        print("updated README.md")
