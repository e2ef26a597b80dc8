"""Where the quantised decode kernel's instructions go: each width's default configuration
compiled for sm_90 (no GPU needed, Triton's bundled ptxas), and the SASS opcodes of one
iteration of its tile loop. Prints registers, shared memory, instructions per iteration and
per (token, KV head) (warp instructions), and the most frequent opcodes. Not a timing: read it
beside benchmarks/gpu_decode.py, which measures.

    python benchmarks/sass_mix.py
"""

from __future__ import annotations

from kvlens_kernels.offline_compile import compile_quant_decode_sm90, main_loop_mix
from kvlens_kernels.quant_decode import launch_defaults


def main() -> None:
    print(
        "| codes | warps | tile tokens | registers | shared KiB | instr / iteration | warp instr / (token, KV head) | top opcodes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    # the launcher's defaults for a few rows (kvlens_kernels/quant_decode.launch_defaults: 8 rows,
    # 128k tokens), query group 4 (32 q / 8 kv), d 128; where the folded query is held per key
    # group, the loop body counted includes its refold, which runs once per group
    for bits in (2, 4, 8):
        s = launch_defaults(bits, 8, 131072)
        kernel = compile_quant_decode_sm90(
            bits, s["num_warps"], s["res_stages"], s["block_n"], s["overlap"], s["fold_per_group"]
        )
        regs, ops = main_loop_mix(kernel)
        n = sum(ops.values())
        top = ", ".join(f"{op} {count}" for op, count in ops.most_common(8))
        warps, tile = s["num_warps"], s["block_n"]
        print(
            f"| int{bits} | {warps} | {tile} | {regs} | {kernel.metadata.shared / 1024:.1f} | {n} | "
            f"{n * warps / tile:.1f} | {top} |"
        )


if __name__ == "__main__":
    main()
