"""Where the quantised decode kernel's instructions go: each width's default configuration
compiled for sm_90 (no GPU needed, Triton's bundled ptxas), and the SASS opcodes of one
iteration of its tile loop. Prints registers, shared memory, instructions per iteration and
per (token, KV head) (warp instructions), and the most frequent opcodes. Not a timing: read it
beside benchmarks/gpu_decode.py, which measures.

    python benchmarks/sass_mix.py
"""

from __future__ import annotations

from kernels.offline_compile import compile_quant_decode_sm90, main_loop_mix


def main() -> None:
    print(
        "| codes | warps | tile tokens | registers | shared KiB | instr / iteration | warp instr / (token, KV head) | top opcodes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    # the launcher's defaults (kernels/quant_decode.py), query group 4 (32 q / 8 kv), d 128
    # (the launcher's defaults for a few rows; where the folded query is held per key group, the
    # loop body counted includes its refold, which runs once per group, not per iteration)
    for bits, warps, res_stages, overlap in [(2, 1, 1, True), (4, 2, 2, False), (8, 2, 2, False)]:
        kernel = compile_quant_decode_sm90(
            bits, warps, res_stages, overlap=overlap, fold_per_group=not overlap
        )
        regs, ops = main_loop_mix(kernel)
        n = sum(ops.values())
        top = ", ".join(f"{op} {count}" for op, count in ops.most_common(8))
        print(
            f"| int{bits} | {warps} | 64 | {regs} | {kernel.metadata.shared / 1024:.1f} | {n} | "
            f"{n * warps / 64:.1f} | {top} |"
        )


if __name__ == "__main__":
    main()
