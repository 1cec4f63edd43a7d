"""Compile every Triton kernel variant for an H100/H200 (sm_90) without a GPU, as the large-tensor case.

Every shape and stride is given as i64 without divisibility hints: what Triton's launcher specialises
to when N x V passes 2^31 (the ordinary launch specialisation, i32 ints and 16-divisibility, is what
`tests/test_sass_model.py` compiles through `benchmarks/sass.py`).

The interpreter runs kernels as NumPy and so cannot catch what only the compiler sees (type errors in
loop-carried values, unsupported ops, constexpr misuse). `triton.compile` with an explicit target
lowers a kernel all the way to a cubin on a machine without CUDA. It must run in a process where
TRITON_INTERPRET is unset (the test suite sets it), hence the subprocess.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_POINTER_TYPES = {"active_ptr": "*i1", "labels_ptr": "*i64"}
_FLOAT_ARGS = {"s_scale", "t_scale", "a1_s", "a1_t", "a1_u", "a2_s", "a2_t", "a2_u", "csd_weight", "ce_weight"}


def _signature(kernel, dtype, constexprs):
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _POINTER_TYPES:
                signature[name] = _POINTER_TYPES[name]
            elif name in ("s_ptr", "t_ptr", "g_ptr"):
                signature[name] = dtype
            else:
                signature[name] = "*fp32"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64"  # shapes and strides: the large-tensor case
    missing = {p.name for p in kernel.params if p.is_constexpr} - set(constexprs)
    assert not missing, f"{kernel.fn.__name__}: no value for constexpr {missing}"
    return signature


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from csd_kernels.kernels import triton_backend as k

    target = GPUTarget("cuda", 90, 32)
    compiled = []
    for dtype in ("*bf16", "*fp32"):
        # CSD ("ss", "ts", "uu", a three-way mixture, "ss" + cross-entropy with components), then
        # forward and reverse KL
        for need, loss, ce in (((1, 0, 0), 0, 0), ((1, 1, 0), 0, 0), ((0, 0, 1), 0, 0), ((1, 1, 1), 0, 0),
                               ((1, 0, 0), 0, 1), ((1, 1, 0), 1, 0), ((1, 1, 0), 2, 0)):
            flags = dict(zip(("NEED_S", "NEED_T", "NEED_U"), map(bool, need)), LOSS=loss, CE=bool(ce))
            lead = 2 if need == (0, 0, 1) else 1 if (need, loss) == ((1, 1, 0), 0) else 0  # "ts": w1 = T
            block, warps, sub, lanes, vec = k.forward_config(32000, 2 if dtype == "*bf16" else 4)
            tile = dict(BLOCK=block, SUB=sub, LANES=lanes, VEC=vec, NATIVE=True, ALIGNED=True, LEAD=lead,
                        WORDS=dtype == "*bf16")
            variants = [
                (k._fwd_kernel, dict(flags, **tile, COMPONENTS=bool(ce), SPLIT=False, REDO=True), warps),
                (k._fwd_kernel, dict(flags, **tile, COMPONENTS=bool(ce), SPLIT=True, REDO=False), warps),
                (k._merge_kernel, dict(flags, COMPONENTS=bool(ce), BLOCK_P=8, RAW=True, REDO=False), 1),
                (k._merge_kernel, dict(flags, COMPONENTS=bool(ce), BLOCK_P=8, RAW=False, REDO=True), 1),
                (k._bwd_kernel, dict(flags, SHARDED=bool(ce), BLOCK=4096, NATIVE=True, PEEL=False, MASKED=True,
                                     VEC=vec), 8),
            ]
            # the backward of rows that are not 16-byte aligned (PEEL): its interior and edge grids
            for masked in (False, True):
                variants.append((k._bwd_kernel, dict(flags, SHARDED=bool(ce), BLOCK=4096, NATIVE=True, PEEL=True,
                                                     MASKED=masked, VEC=vec), 8))
            # the raw forward, unsplit and split (the exact passes over the rows it flags are above), and
            # unsplit over rows that are not 16-byte aligned (PEEL)
            block, raw_warps, sub, lanes, vec = k.forward_config(32000, 2 if dtype == "*bf16" else 4, k.RAW_WARPS)
            raw_tile = dict(tile, BLOCK=block, SUB=sub, LANES=lanes, VEC=vec)
            # (bf16 peeled rows: their edges entry by entry, and as whole words)
            layouts = ((False, False, False), (True, False, False), (False, True, False)) + \
                (((False, True, True),) if dtype == "*bf16" else ())
            for split, peel, edge_words in layouts:
                variants.append((k._fwd_raw_kernel, dict(flags, **raw_tile, COMPONENTS=bool(ce), SPLIT=split,
                                                         RETRY=False, PEEL=peel, EDGE_WORDS=edge_words,
                                                         SHARE_CE=bool(ce) and need[0] == 1),
                                 raw_warps))
            for kernel, constexprs, warps in variants:
                signature = _signature(kernel, dtype, constexprs)
                try:
                    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                except TypeError:  # Triton < 3.3 calls them `constants`
                    source = ASTSource(fn=kernel, signature=signature, constants=constexprs)
                options = {"num_warps": warps}
                if kernel in (k._fwd_kernel, k._fwd_raw_kernel):
                    options["maxnreg"] = k.FORWARD_MAX_REGISTERS
                binary = triton.compile(source, target=target, options=options)
                assert binary.asm["cubin"], f"no cubin for {kernel.fn.__name__}"
                compiled.append(kernel.fn.__name__)
    print(f"compiled {len(compiled)} kernel variants for sm_90")


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "compiled 147 kernel variants" in result.stdout


if __name__ == "__main__":
    compile_all()
