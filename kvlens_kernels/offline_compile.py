"""Compile a Triton kernel for an H100 (sm_90) on a machine without a GPU, with the ptxas that
ships in Triton's wheel; and count the instructions of a compiled kernel's main loop.

Used by the tests (GPU-only compile errors and the shape of the compiled code show up in CI)
and by ``benchmarks/sass_mix.py`` (where a kernel's instructions go, per loop iteration).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile


def compile_sm90(
    fn, pointers: dict[str, str], floats: set[str], constexprs: dict, num_warps: int,
    stages: int, divisible: set[str] = frozenset(),
):  # fmt: skip
    """The compiled kernel for sm_90. Pointer arguments have the given element types, names in
    ``floats`` are fp32 and other arguments int32; pointers and the integers in ``divisible``
    are marked multiples of 16, as Triton specialises them at launch (what lets it vectorise
    loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = set(pointers) | set(divisible)
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    options = {"num_warps": num_warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_quant_decode_sm90(
    bits: int, num_warps: int, res_stages: int, block_n: int = 64, overlap: bool = False,
    fold_per_group: bool = True,
):  # fmt: skip
    """``kvlens_kernels.quant_decode``'s split kernel for sm_90 as its launcher runs it on a
    32 q / 8 kv, d 128 model (query group 4, per-channel keys in groups of 128), ``bits`` for keys and
    values, 3 stages; ``overlap``: the tile loop skewed by one tile; ``fold_per_group``: the
    folded query held across a key group's tiles; lengths passed by value (``DEVICE_LEN``
    off: the eager launch, not the CUDA-graph step's device-held lengths)."""
    from kvlens_kernels.quant_decode import _quant_decode_split

    pointers = dict.fromkeys(["Q", "KS", "KZ", "VS", "VZ", "RK", "RV"], "fp16")
    pointers |= {"KC": "i16", "VC": "i16", "O_PART": "fp32", "L_PART": "fp32", "NLEN": "i32"}
    strides = {"stride_qb", "stride_qh", "kc_bh", "ks_bh", "vc_bh", "vs_bh", "rk_bh", "rv_bh"}
    constexprs = dict(
        GROUP=4, GP=4, D=128, BLOCK_N=block_n, KBITS=bits, VBITS=bits, QGROUP=128,
        PER_CHANNEL=True, FAST=True, RES_STAGES=res_stages, OVERLAP=overlap,
        FOLD_PER_GROUP=fold_per_group, DEVICE_LEN=False,
    )  # fmt: skip
    return compile_sm90(
        _quant_decode_split, pointers, {"scale_log2"}, constexprs, num_warps, 3,
        strides | {"SPLIT_LEN", "N_QUANT"},
    )  # fmt: skip


def _cuobjdump(flag: str, path: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def main_loop_mix(compiled) -> tuple[int, collections.Counter]:
    """(registers per thread, SASS opcode counts of the first backward-branch loop that holds
    tensor-core instructions) of a kernel from ``compile_sm90``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass, usage = (_cuobjdump(flag, path) for flag in ("-sass", "-res-usage"))
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    code = [
        (int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    for addr, text in code:
        target = re.search(r"BRA 0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo, hi = int(target.group(1), 16), addr
            body = [re.sub(r"^@!?U?P\w+\s+", "", t) for a, t in code if lo <= a <= hi]
            if any(op.startswith("HMMA") or op.startswith("HGMMA") for op in body):
                return regs, collections.Counter(op.split()[0] for op in body)
    return regs, collections.Counter()
