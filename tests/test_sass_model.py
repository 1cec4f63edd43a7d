"""The static SASS performance model (`benchmarks/sass.py`): the specialisation it compiles with is
Triton's own, and the kernels keep what lets them run at memory bandwidth (no spills, 128-bit loads and
stores of aligned logits, an issue bound that does not regress).

Compiling needs a process without TRITON_INTERPRET (the suite sets it), hence the subprocesses. These
are numbers of a static model, not measurements.
"""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Regression floors (H200 model, bf16, V = 32000, TB/s), about 2 % under what the kernels reach at the
# commit that set them (benchmarks/results/sass/sass.csv): a change that costs issue slots fails here.
# (The backward's count covers every program of its grid, the last block's idle lanes included.)
FLOORS = {
    ("forward", "csd", "ss", 0): 9.3, ("forward-split", "csd", "ss", 0): 8.75, ("backward", "csd", "ss", 0): 8.1,
    ("forward", "csd", "ss", 1): 8.1, ("forward-split", "csd", "ss", 1): 7.65, ("backward", "csd", "ss", 1): 6.1,
    ("forward", "csd", "ts", 0): 6.8, ("forward-split", "csd", "ts", 0): 6.45, ("backward", "csd", "ts", 0): 6.6,
    ("forward", "csd", "ts", 1): 6.15, ("forward-split", "csd", "ts", 1): 5.85, ("backward", "csd", "ts", 1): 5.12,
    ("forward", "csd", "us", 0): 7.6, ("forward-split", "csd", "us", 0): 7.2, ("backward", "csd", "us", 0): 7.95,
    ("forward", "csd", "uu", 0): 11.85, ("forward-split", "csd", "uu", 0): 11.15,
    ("backward", "csd", "uu", 0): 10.25,
    ("forward", "csd", "mix", 0): 5.8, ("forward-split", "csd", "mix", 0): 5.45,
    ("backward", "csd", "mix", 0): 6.5,
    ("forward", "csd", "mix", 1): 5.2, ("forward-split", "csd", "mix", 1): 5.05,
    ("backward", "csd", "mix", 1): 5.07,
    ("forward", "kl-forward", "-", 0): 6.8, ("forward-split", "kl-forward", "-", 0): 6.45,
    ("backward", "kl-forward", "-", 0): 8.6,
    # the top-k student pass: 2 B per element forward, 4 B backward (no target set; the copy bandwidth is 4.3)
    ("forward", "topk", "-", 0): 5.75, ("backward", "topk", "-", 0): 8.0,
}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def model_rows(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("sass")
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.sass", "--quick", "--out", str(out)],
                            env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "static model, not a measurement" in result.stdout
    with open(out / "sass.csv") as f:
        rows = list(csv.DictReader(f))
    assert (out / "sass.md").read_text().startswith("Static model, not a measurement")
    return rows


def _key(row):
    return row["kernel"], row["loss"], row["weighting"], int(row["ce"])


def test_every_main_variant_is_modelled(model_rows):
    aligned = {_key(r) for r in model_rows if r["vocab"] == "32000"}
    assert set(FLOORS) <= aligned, sorted(set(FLOORS) - aligned)


def test_no_spills_and_full_width_logits_accesses(model_rows):
    for row in model_rows:
        name = f"{_key(row)} V={row['vocab']}"
        assert int(row["spills"]) == 0, f"{name}: {row['spills']} bytes of local memory"
        if row["vocab"] == "32000":  # rows start 16-byte aligned: 128-bit loads and stores
            assert int(row["vector_bits"]) == 128, f"{name}: {row['vector_bits']}-bit logits loads"
            if row["kernel"] == "backward":
                assert int(row["store_bits"]) == 128, f"{name}: {row['store_bits']}-bit gradient stores"
        else:
            # V = 50257 (GPT-2): rows not 16-byte aligned, which the forwards and the backwards (the
            # top-k student pass's too) tile from the aligned address before each row (PEEL; a
            # backward's masked edges are a grid of their own, counted in its instructions)
            assert int(row["vector_bits"]) == 128, f"{name}: {row['vector_bits']}-bit logits loads"
            if row["kernel"] == "backward":
                assert int(row["store_bits"]) == 128, f"{name}: {row['store_bits']}-bit gradient stores"


def test_issue_bound_does_not_regress(model_rows):
    low = [f"{_key(r)}: {r['issue_bound_tbps']} < {FLOORS[_key(r)]}" for r in model_rows
           if r["vocab"] == "32000" and _key(r) in FLOORS and float(r["issue_bound_tbps"]) < FLOORS[_key(r)]]
    assert not low, low


def test_issue_bound_meets_the_targets(model_rows):
    """Every variant, at V = 32000 and at the misaligned V = 50257 (an even number of rows: their
    masked edges load as whole words)."""
    low = [f"{_key(r)} V={r['vocab']}: {r['issue_bound_tbps']} < {r['target_tbps']}" for r in model_rows
           if r["target_tbps"] and float(r["issue_bound_tbps"]) < float(r["target_tbps"])]
    assert not low, low


_SPECIALISATION = r'''
import torch
from triton.backends.compiler import GPUTarget
from benchmarks import sass

target = GPUTarget("cuda", 90, 32)
for vocab in (32000, 50257):
    launch = next(l for l in sass.record_launches("csd", "ts", 1, "bfloat16", vocab) if l[0] == "backward")
    _, fn, grid, args, kwargs = launch
    signature, constexprs, attrs, options = sass.specialise(fn, args, kwargs, target)
    names = [p.name for p in fn.params]
    divisible = {names[path[0]] for path, values in attrs.items() if ["tt.divisibility", 16] in values}
    print(vocab, signature["s_ptr"], signature["labels_ptr"], signature["V"], signature["s_si"],
          "V" in divisible, "s_si" in divisible, "s_ptr" in divisible, options.num_warps)
'''


def test_specialisation_is_the_launchers():
    """Triton's binder decides types and divisibility from the real arguments: bf16 logits, int64
    labels, i32 shapes; V = 32000 (and the row stride) divisible by 16, V = 50257 not."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _SPECIALISATION], env=_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.split() for line in result.stdout.strip().splitlines()]
    assert lines[0] == ["32000", "*bf16", "*i64", "i32", "i32", "True", "True", "True", "8"], lines[0]
    assert lines[1] == ["50257", "*bf16", "*i64", "i32", "i32", "False", "False", "True", "8"], lines[1]


_WARP_FALLBACK_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0020*/                   MUFU.EX2 R5, R5 ;
        /*0030*/                   BRA.DIV UR5, `(.L_x_3) ;
        /*0040*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
.L_x_2:
        /*0050*/                   FADD R7, R6, R5 ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
        /*0070*/                   MUFU.EX2 R8, R7 ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   SHFL.BFLY P0, R6, R5, R9, R10 ;
        /*00a0*/                   BRA `(.L_x_2) ;
.L_x_4:
        /*00b0*/                   BRA `(.L_x_4) ;
"""


def test_hot_path_ignores_the_jumps_back_from_cold_fallbacks():
    """ptxas puts a warp-divergence fallback (BRA.DIV) after the kernel's EXIT and jumps back from it
    unconditionally: that is not a loop, and taking it for one once made every one-warp forward look
    half as fast (its range swallowed the real loop and the masked tail)."""
    from benchmarks import sass

    instructions, labels = sass.parse_sass(_WARP_FALLBACK_SASS)
    body, rest = sass.hot_path(instructions, labels, marker="MUFU.EX2")
    assert [x.split()[0] for x in body] == ["LDG.E.128", "MUFU.EX2", "BRA.DIV", "SHFL.BFLY", "FADD", "@P0"], body
    # after the loop: the EXIT path counts; the fallback (reached only through BRA.DIV) and the trap do not
    assert rest == ["MOV R1, c[0x0][0x28]", "MUFU.EX2 R8, R7", "EXIT"], rest


_BRANCHES_SASS = """
        /*0000*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;
        /*0010*/              @!P0 BRA `(.L_x_1) ;
        /*0020*/                   FADD R1, R1, R1 ;
.L_x_1:
        /*0030*/                   FMUL R2, R2, R2 ;
        /*0040*/              @!P0 BRA P2, `(.L_x_1) ;
        /*0050*/                   BRA `(.L_x_2) ;
        /*0060*/                   FFMA R3, R3, R3, R3 ;
.L_x_2:
        /*0070*/               @P1 EXIT ;
        /*0080*/                   BRA.DIV UR4, `(.L_x_3) ;
        /*0090*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*00a0*/                   EXIT ;
.L_x_3:
        /*00b0*/                   SHFL.BFLY P0, R6, R5, R9, R10 ;
        /*00c0*/                   EXIT ;
"""


def test_converged_code_follows_every_branch_but_bra_div():
    """A predicated branch, and a branch on a second predicate (`BRA P2, target`), may fall through; an
    unconditional one may not (the FFMA after it is dead); a predicated EXIT may fall through; BRA.DIV's
    fallback is left out. Cutting it (or following it) would change every kernel's rest count."""
    from benchmarks import sass

    instructions, labels = sass.parse_sass(_BRANCHES_SASS)
    kept = [address for address, _ in sass.converged(instructions, labels)]
    assert kept == [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x70, 0x80, 0x90, 0xa0], [hex(a) for a in kept]
