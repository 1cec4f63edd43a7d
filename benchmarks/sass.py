"""A static performance model of the Triton kernels, read from their sm_90 (or sm_80) SASS: no GPU needed.

    python -m benchmarks.sass --out benchmarks/results/sass            # sm_90, the H200 model
    python -m benchmarks.sass --out DIR --arch sm_80 --gpu H100-SXM

For every kernel variant the launchers run (forward with one program per row and with split rows, the
merge, the backward; every weighting class, a three-way mixture, KL forward and reverse; with and
without the fused cross-entropy; bf16 and fp32; rows of V = 32000 and the misaligned V = 50257), the
launcher is called on meta tensors with its real shapes, its kernel launch is intercepted, and the
arguments go through **Triton's own launch-time specialisation** (the binder `JITFunction.run` uses: ints
as i32 or i64, divisibility by 16 of pointers, shapes and strides), so the compiled binary is the one a
real launch would build. `triton.compile` lowers it for the target, and the `nvdisasm`/`cuobjdump` that
ship in the Triton wheel give its SASS and resource usage. Written to DIR/sass.csv (one row per
variant) and DIR/sass.md.

The model. A Hopper SM has 4 schedulers, each issuing at most one warp-instruction per clock, so a kernel
that needs `w` warp-instructions per element can stream at most

    issue_bound = SMs x 4 x clock / w   elements per second,   x bytes per element

(forward: s and t read, 2 x itemsize; backward: s, t read and the gradient written, 3 x itemsize; the
top-k student pass (`loss` topk, K = 64 ids a row) reads s alone forward, s and the gradient backward).
`w` counts the hot path: the vocabulary loop's body (a dense forward's statistics loop, the one with
the exponentials) without the blocks that a forward branch inside it jumps over, times num_warps /
BLOCK, plus every other instruction of the kernel amortised over the row's columns (the search for the
first shift, the masked last block, the merge of the lanes, finalisation: a conservative count, since
it includes the excluded-row path and counts the loop body over the blocks those take too). The
backward has no loop: each program issues all of its code, so `w` is its instructions times num_warps
times the grid's programs per row over V (the last block's idle lanes count), summed over its grids
where there are two (rows not 16-byte aligned: the interior blocks, then the masked edges). Only code a
converged warp can reach counts: not the fallbacks ptxas adds after EXIT for warp shuffles it cannot
prove convergent, entered through BRA.DIV only when a warp has diverged, which these kernels' per-program
branches never cause (`converged`). A kernel measured on an H200 reached about
70 % of such a bound, so a kernel needs an issue bound of about 1.4x the copy bandwidth to run at the copy
bandwidth. **These numbers are a static model, not a measurement**; the GPU-validation issue calibrates
them against measured bandwidth on the same variants.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# The hardware constants of the model, in one place. Copy bandwidths: H200 measured on this project's
# device machines (a device-to-device copy, bytes read plus written, 2026-10-28 and 2026-11-04); H100 the
# datasheet figure.
GPUS = {
    "H200": dict(sms=132, schedulers=4, clock_ghz=1.98, copy_tbps=4.3),
    "H100-SXM": dict(sms=132, schedulers=4, clock_ghz=1.98, copy_tbps=3.35),
}
# Per-SM limits for occupancy: (registers, max warps, max blocks, shared memory bytes available to blocks)
ARCHS = {"sm_90": (65536, 64, 32, 227 * 1024), "sm_80": (65536, 64, 32, 163 * 1024)}
# The targets of the kernel issue (bf16, TB/s under the H200 model): one softmax base, two, with CE.
TARGETS = {"one-base": 7.0, "two-base": 5.5, "ce": 5.0}

WEIGHTINGS = {
    "ss": "ss", "ts": "ts", "st": "st", "us": "us", "tt": "tt", "uu": "uu",
    "mix": ({"teacher": 0.3, "student": 0.5, "uniform": 0.2}, {"teacher": 0.15, "student": 0.85}),
}
FIELDS = ["kernel", "loss", "weighting", "ce", "dtype", "arch", "vocab", "aligned", "block", "num_warps",
          "registers", "spills", "shared_bytes", "blocks_per_sm", "vector_bits", "store_bits",
          "warp_instr_per_elem", "barriers_per_elem", "mufu_per_elem", "issue_bound_tbps", "target_tbps",
          "gpu_model", "triton", "commit"]


# The top-k losses' student pass (topk_triton.py) with K = TOPK_K support ids per row: one kernel
# whatever the weighting (the losses proper run the dense kernels on (N, K + 1) rows).
TOPK_K = 64


def variants():
    """(loss, weighting code, ce) of every loss variant the model covers."""
    out = [("csd", code, ce) for code in WEIGHTINGS for ce in (0, 1)]
    return out + [("kl-forward", "st", 0), ("kl-reverse", "st", 0), ("topk", "-", 0), ("topk", "-", 1)]


def target_for(loss, weighting, ce):
    if loss == "topk":
        return ""  # the issue set no target: compare with the copy bandwidth (GPUS)
    if ce:
        return TARGETS["ce"]
    if loss.startswith("kl") or weighting in ("ts", "st", "mix"):
        return TARGETS["two-base"]
    return TARGETS["one-base"]


def _spec(loss, weighting, ce):
    from csd_kernels.contract import LossSpec, kl_spec, parse_weighting

    if loss == "csd":
        return LossSpec(*parse_weighting(WEIGHTINGS[weighting]), 1.0, 1.0, ce_weight=0.5 if ce else 0.0)
    return kl_spec(loss[3:], 1.0)


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


class _Pointer:
    """What Triton's specialisation reads of a tensor argument: its dtype and address (alignment)."""

    def __init__(self, x):
        self.dtype = x.dtype
        self._address = (1 << 20) + x.storage_offset() * x.element_size()  # allocations are 256-aligned

    def data_ptr(self):
        return self._address


def _record_topk_launches(ce, dtype, vocab, rows):
    import torch

    from csd_kernels.kernels import topk_triton as tk

    originals = {name: getattr(tk, name) for name in ("_topk_fwd_kernel", "_topk_bwd_kernel",
                                                      "_topk_support_kernel")}
    launches = []
    try:
        for name, fn in originals.items():
            setattr(tk, name, _Recorder(fn, launches))
        s = torch.empty(rows, vocab, dtype=dtype, device="meta")
        ids = torch.empty(rows, TOPK_K, dtype=torch.int32, device="meta")
        active = torch.ones(rows, dtype=torch.bool, device="meta")
        per_row = torch.empty(rows, device="meta")
        tk.student_pass(s, ids, active, True)
        labels = torch.zeros(rows, dtype=torch.int64, device="meta") if ce else None
        tk.student_backward(s, ids, active, labels, per_row, per_row, torch.empty(rows, TOPK_K, device="meta"),
                            per_row if ce else None, True)
    finally:
        for name, fn in originals.items():
            setattr(tk, name, fn)
    roles = {"_topk_fwd_kernel": "forward", "_topk_bwd_kernel": "backward", "_topk_support_kernel": "scatter"}
    return [(_edges(roles[fn.__name__], kwargs), fn, grid, args, kwargs) for fn, grid, args, kwargs in launches]


def _edges(role, kwargs):
    """A backward's second grid over rows not 16-byte aligned (PEEL's masked edges) is its own role."""
    return role + "-edges" if role == "backward" and kwargs.get("PEEL") and kwargs.get("MASKED") else role


def record_launches(loss, weighting, ce, dtype_name, vocab, rows=8192, split_rows=16, sms=132):
    """Run the launchers on meta tensors; return [(role, JITFunction, grid, args, kwargs)]. The split
    forward is what the launcher picks for `split_rows` rows on a GPU of `sms` SMs."""
    import torch

    if loss == "topk":
        return _record_topk_launches(ce, getattr(torch, dtype_name), vocab, rows)

    from csd_kernels.kernels import stats as st
    from csd_kernels.kernels import triton_backend as tb

    dtype = getattr(torch, dtype_name)
    spec = _spec(loss, weighting, ce)
    out = []
    # (an older checkout has no raw forward: the model then reads its kernels as they were)
    names = tuple(n for n in ("_fwd_raw_kernel", "_fwd_kernel", "_merge_kernel", "_bwd_kernel") if hasattr(tb, n))
    originals = {name: getattr(tb, name) for name in names + ("_num_sms",)}
    try:
        tb._num_sms = lambda device: sms
        for role, n_rows, splits in (("forward", rows, 1), ("forward-split", split_rows, None),
                                     ("backward", rows, None)):
            launches = []
            for name in names:
                setattr(tb, name, _Recorder(originals[name], launches))
            s = torch.empty(n_rows, vocab, dtype=dtype, device="meta")
            t = torch.empty(n_rows, vocab, dtype=dtype, device="meta")
            active = torch.ones(n_rows, dtype=torch.bool, device="meta")
            labels = torch.zeros(n_rows, dtype=torch.int64, device="meta") if ce else None
            if role == "backward":
                stats = torch.zeros(n_rows, st.NUM_STATS, device="meta")
                grad_rows = torch.ones(1, device="meta").expand(n_rows)
                tb.backward(s, t, active, labels, stats, grad_rows, spec)
            else:
                tb.forward(s, t, active, labels, spec, components=bool(ce), splits=splits)
            for fn, grid, args, kwargs in launches:
                # An unsplit forward is the raw pass, its second pass ("retry", the same code) and the
                # exact pass ("redo") over the rows it flags: those cost only on the flagged rows.
                kind = {"_fwd_raw_kernel": "retry" if kwargs.get("RETRY") else role,
                        "_fwd_kernel": "redo" if kwargs.get("REDO") else role,
                        "_merge_kernel": "merge", "_bwd_kernel": _edges("backward", kwargs)}[fn.__name__]
                out.append((kind, fn, grid, args, kwargs))
    finally:
        for name, fn in originals.items():
            setattr(tb, name, fn)
    return out


def specialise(fn, args, kwargs, target):
    """Triton's launch-time specialisation of these arguments: (signature, constexprs, attrs, options)."""
    import torch
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in this Triton wheel ({path})")
    return path


_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")


def parse_sass(text):
    """[(address, instruction)] and {label: address} from `nvdisasm -c` output."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.match(line)
        if match:
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, match.group(2).strip()))
    return instructions, labels


_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def converged(instructions, labels):
    """The instructions a converged warp can reach from the kernel's entry, in order: every path of the
    branches (BRA, predicated or not) except BRA.DIV's. ptxas places a fallback after the kernel's
    EXIT for each warp shuffle it cannot prove convergent; BRA.DIV jumps there only when some of the
    warp's threads have left the path. These kernels branch on per-program values only (a row, its
    blocks, its flags), so a warp never diverges before a shuffle and never issues those fallbacks."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    seen, stack = set(), [0]
    while stack:
        i = stack.pop()
        while i < len(instructions) and i not in seen:
            seen.add(i)
            text = instructions[i][1]
            guarded = text.startswith("@") and not text.startswith("@PT ")
            op, _, operands = (text.split(None, 1)[1] if text.startswith("@") else text).partition(" ")
            if op.startswith("BRA") and op != "BRA.DIV":
                stack.append(index[labels[_TARGET.search(operands).group(1)]])
                # `BRA P2, target`: a second predicate makes it conditional too
                if not guarded and not re.match(r"!?U?P[0-9]", operands.strip()):
                    break
            elif op in ("EXIT", "RET", "BPT.TRAP") and not guarded:
                break
            i += 1
    return [instructions[i] for i in sorted(seen)]


def hot_path(instructions, labels, marker=None):
    """(loop body on its hot path, everything else): the innermost backward branch's range, without
    the ranges that forward branches inside it jump over. `marker`: only loops containing an instruction
    with that opcode count most (the top-k forward: DADD, its fp64 sum pass rather than the exact pass or the loops over the ids); the
    other loops' bodies are then left out of "everything else" (paths for rare rows). Only the code a
    converged warp can reach counts (`converged`)."""
    instructions = converged(instructions, labels)
    body = []
    loops = []
    for address, text in instructions:
        branch = _BRANCH.search(text)
        # A backward branch closes a loop. (The unconditional jumps back from the divergence fallbacks,
        # whose range would swallow the real loop, and the `BRA self` trap are not converged code.)
        if branch and labels.get(branch.group(1), address) < address:
            loops.append((labels[branch.group(1)], address))
    others = []
    pick = lambda r: r[1] - r[0]  # noqa: E731 (the innermost loop)
    if marker is not None:
        count = lambda lo, hi: sum(lo <= a <= hi and marker in t for a, t in instructions)  # noqa: E731
        best = max(loops, key=lambda r: count(*r))
        others = [loop for loop in loops if loop != best]
        loops, pick = [best], lambda r: 0
    if loops:
        start, stop = min(loops, key=pick)
        skipped = []
        for address, text in instructions:
            branch = _BRANCH.search(text)
            if start <= address < stop and branch and text.startswith("@") and labels[branch.group(1)] > address:
                skipped.append((address, labels[branch.group(1)]))
        for address, text in instructions:
            if start <= address <= stop and not any(a < address < b for a, b in skipped):
                body.append(text)
    rest = [text for address, text in instructions if not (loops and start <= address <= stop)
            and not any(lo <= address <= hi for lo, hi in others)]
    return [x for x in body if not x.startswith("NOP")], [x for x in rest if not x.startswith("NOP")]


def _width(text):
    op = text.split()[1] if text.startswith("@") else text.split()[0]
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if suffix in op:
            return bits
    return 32


def memory_bits(instructions, opcode, itemsize):
    """Width in bits of the logits accesses (`opcode` LDG or STG) of the hot code: the narrowest
    predicated (masked) access at least one logit (`itemsize` bytes) wide, or, where none is masked,
    the widest access. A kernel's per-row scalars (flags, statistics, labels) are loaded unmasked and
    at most 64 bits wide, so unmasked logits report 128 only if they move in 128 bits."""
    ops = [x for x in instructions if re.search(rf"\b{opcode}\b", x)]
    masked = [x for x in ops if x.startswith("@") and _width(x) >= 8 * itemsize]
    return min(map(_width, masked)) if masked else max(map(_width, ops), default=0)


def resources(cubin_path):
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    values = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in values.items()}


def blocks_per_sm(registers, num_warps, shared, arch):
    regs, max_warps, max_blocks, smem = ARCHS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = regs // (per_warp * num_warps)
    by_smem = smem // (shared + 1024) if shared else max_blocks
    return max(0, min(by_regs, max_warps // num_warps, max_blocks, by_smem))


def _read(launch, arch):
    """Compile one recorded launch for `arch` with Triton's launch specialisation: (instructions,
    labels, resource usage, num_warps) of its SASS."""
    _, fn, _, args, kwargs = launch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", int(arch[3:]), 32)
    signature, constexprs, attrs, options = specialise(fn, args, kwargs, target)
    binary = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(binary.asm["cubin"])
        text = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        usage = resources(path)
    usage["SHARED"] = max(usage.get("SHARED", 0), int(getattr(binary.metadata, "shared", 0) or 0))
    instructions, labels = parse_sass(text)
    return instructions, labels, usage, options.num_warps


def analyse(meta):
    """Compile one launch (its launcher re-run on meta tensors) and read its SASS: one CSV row (a dict).

    The backward of rows that are not 16-byte aligned runs two grids (PEEL: the interior blocks, then
    the masked edges): its count is theirs together, each program's instructions times its grid's
    programs per row, over the row's entries; the load and store widths are the interior grid's."""
    launches = record_launches(meta["loss"], meta["weighting"], meta["ce"], meta["dtype"], meta["vocab"])
    launch = next((launch for launch in launches if launch[0] == meta["kind"]), None)
    if launch is None:  # a launcher without this role (an older checkout: no exact redo pass)
        return None
    kind, fn, grid, args, kwargs = launch
    arch = meta["arch"]
    instructions, labels, usage, warps = _read(launch, arch)
    topk = meta["loss"] == "topk"
    # The hot loop: the top-k forward's fp64 sum pass (DADD); a dense forward's statistics loop (its
    # exponentials), not the short search for a row's first valid block before it.
    marker = ("DADD" if topk else "MUFU.EX2") if kind in ("forward", "redo", "forward-split") else None
    body, rest = hot_path(instructions, labels, marker=marker)
    block = kwargs.get("BLOCK", kwargs.get("BLOCK_P", 1))
    vocab = meta["vocab"]
    if kind == "merge":
        columns = vocab  # one program per row: its work is spread over the row's elements
        per_elem = len(rest) * warps / columns
        loop_per_elem = mufu = bars = 0.0
    elif body:  # the forward: a loop over the row's (or the program's) columns
        columns = vocab if kind in ("forward", "redo") else -(-vocab // int(grid[1]))
        loop_per_elem = len(body) * warps / block
        per_elem = loop_per_elem + len(rest) * warps / columns
        mufu = sum("MUFU" in x for x in body) * warps / block
        bars = sum("BAR" in x for x in body) / block
    else:  # the backward: one block per program, no loop; every program issues all of its code
        grids = [(rest, warps, int(grid[1]))]
        for other in (x for x in launches if x[0] == kind + "-edges"):
            edge_instructions, edge_labels, edge_usage, edge_warps = _read(other, arch)
            grids.append((hot_path(edge_instructions, edge_labels)[1], edge_warps, int(other[2][1])))
            usage = {k: max(v, edge_usage.get(k, 0)) for k, v in usage.items()}
        # per element over the grids: warp-instructions (a barrier counts once per program)
        count = lambda opcode=None, per_warp=True: sum(  # noqa: E731
            sum(opcode is None or opcode in x for x in code) * (w if per_warp else 1) * programs
            for code, w, programs in grids) / vocab
        per_elem, mufu, bars = count(), count("MUFU"), count("BAR", per_warp=False)
    hot = body or rest
    itemsize = 2 if meta["dtype"] == "bfloat16" else 4
    # Arrays streamed per element: dense s, t (+ the gradient); top-k s (+ the gradient).
    bytes_per_elem = ((1 if topk else 2) + (kind == "backward")) * itemsize
    gpu = GPUS[meta["gpu"]]
    bound = gpu["sms"] * gpu["schedulers"] * gpu["clock_ghz"] * 1e9 / per_elem * bytes_per_elem / 1e12
    shared = usage["SHARED"]
    registers = usage.get("REG", 0)
    return dict(
        kernel=kind,
        loss=meta["loss"], weighting=meta["weighting"] if meta["loss"] == "csd" else "-", ce=meta["ce"],
        dtype=meta["dtype"], arch=arch, vocab=vocab, aligned=int(vocab % 8 == 0), block=block,
        num_warps=warps, registers=registers, spills=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        shared_bytes=shared, blocks_per_sm=blocks_per_sm(registers, warps, shared, arch),
        vector_bits=memory_bits(hot, "LDG", itemsize),
        store_bits=memory_bits(hot, "STG", itemsize) if kind == "backward" else "",
        warp_instr_per_elem=round(per_elem, 4), barriers_per_elem=round(bars, 5), mufu_per_elem=round(mufu, 4),
        issue_bound_tbps=round(bound, 2) if kind != "merge" else "",
        # the exact pass over flagged rows ("redo") costs only on those rows: no target of its own
        target_tbps=target_for(meta["loss"], meta["weighting"], meta["ce"]) if kind not in ("merge", "redo") else "",
        gpu_model=meta["gpu"],
    )


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


QUICK = {("csd", "ss", 0), ("csd", "ts", 0), ("csd", "uu", 0), ("csd", "us", 0), ("csd", "mix", 0),
         ("csd", "ss", 1), ("csd", "ts", 1), ("csd", "mix", 1), ("kl-forward", "st", 0), ("topk", "-", 0)}


def jobs(arch="sm_90", gpu="H200", dtypes=("bfloat16", "float32"), vocabs=(32000, 50257), quick=False):
    """The variants to compile; `quick` (the test suite's): bf16, the main losses, forward (split and
    not) and backward."""
    out = []
    kinds = ("forward", "forward-split", "backward") if quick else ("forward", "redo", "forward-split", "merge", "backward")
    for dtype in ("bfloat16",) if quick else dtypes:
        for vocab in vocabs:
            for loss, weighting, ce in variants():
                if quick and (loss, weighting, ce) not in QUICK:
                    continue
                if vocab % 8 and (ce or weighting not in ("ss", "ts", "-")):
                    continue  # the misaligned rows: a few variants are enough to show the load width
                for kind in kinds:
                    if loss == "topk" and kind not in ("forward", "backward"):
                        continue
                    out.append(dict(kind=kind, loss=loss, weighting=weighting, ce=ce, dtype=dtype, vocab=vocab,
                                    arch=arch, gpu=gpu))
    return out


def run(out_dir, arch="sm_90", gpu="H200", workers=None, quick=False):
    import triton

    os.makedirs(out_dir, exist_ok=True)
    work = jobs(arch, gpu, quick=quick)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        rows = [row for row in pool.map(analyse, work, chunksize=4) if row is not None]
    stamp = dict(triton=triton.__version__, commit=_commit())
    for row in rows:
        row.update(stamp)
    with open(os.path.join(out_dir, "sass.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "sass.md"), "w") as f:
        f.write(markdown(rows))
    return rows


def markdown(rows, dtype="bfloat16"):
    gpu = rows[0]["gpu_model"] if rows else "H200"
    lines = [f"Static model, not a measurement: issue-bound TB/s on the {gpu} model ({rows[0]['arch'] if rows else ''}, "
             f"Triton {rows[0].get('triton', '') if rows else ''}), {dtype}, V = 32000; "
             f"`python -m benchmarks.sass`.", "",
             "| loss | weighting | CE | kernel | warp-instr/elem | regs | spills | blocks/SM | load bits | "
             "issue bound TB/s | target |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["dtype"] != dtype or r["vocab"] != 32000 or r["kernel"] == "merge":
            continue
        lines.append(f"| {r['loss']} | {r['weighting']} | {r['ce']} | {r['kernel']} | {r['warp_instr_per_elem']} | "
                     f"{r['registers']} | {r['spills']} | {r['blocks_per_sm']} | {r['vector_bits']} | "
                     f"{r['issue_bound_tbps']} | {r['target_tbps']} |")
    return "\n".join(lines) + "\n"


def comparison(before, after, dtype="bfloat16", vocab=32000, kernels=("forward", "backward")):
    """Markdown: warp-instructions per element and issue bound of each main variant, before -> after."""
    key = lambda r: (r["kernel"], r["loss"], r["weighting"], str(r["ce"]))  # noqa: E731
    pick = lambda rows: {key(r): r for r in rows if r["dtype"] == dtype and str(r["vocab"]) == str(vocab)  # noqa: E731
                         and r["kernel"] in kernels}
    old, new = pick(before), pick(after)
    stamp = lambda rows: f"Triton {rows[0]['triton']}, commit {rows[0]['commit']}" if rows else "none"  # noqa: E731
    lines = [f"Static model ({after[0]['gpu_model']}, {after[0]['arch']}), not a measurement: {dtype}, V = {vocab}. "
             f"Before: {stamp(before)}; after: {stamp(after)}.", "",
             "| kernel | loss | weighting | CE | warp-instr/elem before | after | issue bound TB/s before | after | "
             "target | registers after |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in new.items():
        b = old.get(k, {})
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {b.get('warp_instr_per_elem', '')} | "
                     f"{r['warp_instr_per_elem']} | {b.get('issue_bound_tbps', '')} | {r['issue_bound_tbps']} | "
                     f"{r['target_tbps']} | {r['registers']} |")
    return "\n".join(lines) + "\n"


def update_readme(out_dir):
    """Copy the before/after table of DIR/sass-before.csv and DIR/sass.csv into README.md."""
    from .plots import write_between_markers

    load = lambda name: list(csv.DictReader(open(os.path.join(out_dir, name))))  # noqa: E731
    before = load("sass-before.csv") if os.path.exists(os.path.join(out_dir, "sass-before.csv")) else []
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    after = load("sass.csv")
    # and the rows that are not 16-byte aligned (GPT-2's vocabulary), split forward included
    write_between_markers(readme, "sass", comparison(before, after) + "\n" + comparison(
        before, after, vocab=50257, kernels=("forward", "forward-split", "backward")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/sass")
    parser.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    parser.add_argument("--gpu", default="H200", choices=sorted(GPUS))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="bf16, the main losses, forward (split and not) and backward")
    parser.add_argument("--readme", action="store_true",
                        help="only copy the before/after table of DIR/sass-before.csv and DIR/sass.csv into README.md")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(args.out)
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks.sass compiles kernels: run it without TRITON_INTERPRET")
    rows = run(args.out, args.arch, args.gpu, args.workers, args.quick)
    missed = [r for r in rows if r["dtype"] == "bfloat16" and r["target_tbps"] != ""
              and r["aligned"] and r["issue_bound_tbps"] < r["target_tbps"]]
    print(f"{len(rows)} variants -> {os.path.join(args.out, 'sass.csv')} (static model, not a measurement); "
          f"{len(missed)} aligned bf16 variants below their target")
    for r in missed:
        print(f"  below target: {r['kernel']} {r['loss']} {r['weighting']} ce={r['ce']}: "
              f"{r['issue_bound_tbps']} < {r['target_tbps']} TB/s")


if __name__ == "__main__":
    main()
