"""What the split-sequence (flash-decoding) decode kernels share: how the sequence is cut into
splits, the online-softmax step over one block of full-precision keys, and the kernel that
combines the splits' partial outputs by their log-sum-exp.

A decode kernel runs one program per (batch, KV head, split). The program holds every query
head of the KV group (padded to a power of two; products run on tensor cores), walks its
slice of the sequence, and writes a partial output [GROUP_PAD, D] and a base-2 log-sum-exp
per row into ``o_part`` / ``l_part`` laid out as [B, Hkv, n_splits, GROUP_PAD(, D)]. Then
``combine_splits`` weights each split by exp2(lse - max lse) and writes [B, Hq, D].
"""

from __future__ import annotations

import functools
import math

import torch

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

LOG2E = 1.4426950408889634


def group_pad(group: int) -> int:
    """Rows a program holds for ``group`` query heads: the next power of two. Triton pads a
    product with fewer than 16 rows to the tensor-core shape itself; holding only the real rows
    keeps registers and softmax work small (1.2-1.4x faster quantised decode than padding to
    16 in registers, measured on an H100, benchmarks/RESULTS.md)."""
    return 1 << (group - 1).bit_length()


def plan_splits(
    length: int, programs: int, block_n: int, device: torch.device, waves: int = 4,
    min_split: int = 0,
) -> int:  # fmt: skip
    """Split length (a multiple of ``block_n``, at least ``min_split``) so that ``programs`` x
    splits fills the GPU about ``waves`` times over."""
    sms = _sm_count(device) if device.type == "cuda" else 4  # interpreter: exercise the combine
    blocks = max(1, math.ceil(length / block_n))
    n_splits = max(1, min(blocks, math.ceil(waves * sms / max(1, programs))))
    return max(math.ceil(blocks / n_splits) * block_n, math.ceil(min_split / block_n) * block_n)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def partial_buffers(bsz: int, hkv: int, n_splits: int, gp: int, d: int, device):
    f32 = {"device": device, "dtype": torch.float32}
    return (
        torch.empty(bsz * hkv * n_splits * gp, d, **f32),
        torch.empty(bsz * hkv * n_splits * gp, **f32),
    )


if triton is not None:

    @triton.jit
    def softmax_block(q, k, v, ok, m_i, l_i, acc, scale_log2):
        """One online-softmax step: q [GP, D], k/v [BN, D] (q's dtype), ok [BN] valid keys."""
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def store_partial(O_PART, L_PART, row0, m_i, l_i, acc, GP: tl.constexpr, D: tl.constexpr):
        """Write a program's normalised partial output and base-2 LSE at rows row0 + [0, GP)."""
        rows = row0 + tl.arange(0, GP)
        positive = l_i > 0
        denom = tl.where(positive, l_i, 1.0)
        tl.store(O_PART + rows[:, None] * D + tl.arange(0, D)[None, :], acc / denom[:, None])
        tl.store(L_PART + rows, tl.where(positive, m_i + tl.log2(denom), float("-inf")))

    @triton.jit
    def _combine_kernel(
        O_PART, L_PART, OUT, H_Q, N_SPLITS,
        GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        CHUNK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # b * H_Q + query head
        d0 = tl.program_id(1) * BLOCK_D  # this program's channels
        b = row // H_Q
        hq = row % H_Q
        h_kv = H_Q // GROUP
        base = (b * h_kv + hq // GROUP) * N_SPLITS * GP + hq % GROUP
        offs_d = d0 + tl.arange(0, BLOCK_D)
        # one pass, rescaled as the maximum grows (an online softmax over splits): a chunk's
        # LSEs and partial outputs load together, one memory round trip per CHUNK splits
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        out = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, N_SPLITS, CHUNK):
            offs_c = s0 + tl.arange(0, CHUNK)
            ok = offs_c < N_SPLITS
            lse = tl.load(L_PART + base + offs_c * GP, mask=ok, other=float("-inf"))
            o = tl.load(
                O_PART + (base + offs_c * GP)[:, None] * D + offs_d[None, :],
                mask=ok[:, None],
                other=0.0,
            )
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            total = total * alpha + tl.sum(w, 0)
            out = out * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        total = tl.where(total > 0, total, 1.0)
        tl.store(OUT + row * D + offs_d, (out / total).to(OUT.dtype.element_ty))


def combine_splits(
    o_part: torch.Tensor, l_part: torch.Tensor, bsz: int, hq: int, group: int, n_splits: int,
    d: int, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """[B, Hq, D] in ``dtype``: the splits' partial outputs weighted by their LSE."""
    out = torch.empty(bsz, hq, d, device=o_part.device, dtype=dtype)
    # programs per (row, block of 32 channels), up to 256 splits per load: a batch-1 row of
    # ~130 splits (8 waves) is one round trip to memory, and 4x the programs share the reads
    # (the combine was 8.4 of 31.6 us per KIVI-2 decode step at 32k in a profile,
    # benchmarks/RESULTS.md)
    block_d = min(d, 32)
    chunk = min(256, max(16, triton.next_power_of_2(n_splits)))
    _combine_kernel[(bsz * hq, triton.cdiv(d, block_d))](
        o_part, l_part, out, hq, n_splits,
        GROUP=group, GP=group_pad(group), D=d, BLOCK_D=block_d, CHUNK=chunk,
    )  # fmt: skip
    return out


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference decode of one KV head: q [G, D] over k/v [L, D], float32 softmax. The numbers
    of ``softmax(q @ k.T * scale) @ v`` for every shape (``head_products`` of one head)."""
    return attend_heads(q[None], k[None], v[None], scale)[0]


def attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference decode of H KV heads holding the same number of rows, in one batched product:
    q [H, G, D] over k/v [H, L, D], float32 softmax; [H, G, D]. Per head the numbers of
    ``attend_rows`` where ``head_products`` gives each head's own product (the embedded
    models' shapes), elsewhere within float32 rounding.

    Batched, not one ``q @ k.T`` per head: besides the fewer calls, MKL spreads that
    [G, D] x [D, L] product over threads, which then wait for a core whenever the machine is
    busy (92-3800 us a product instead of 12 us on the 2-core development machine under
    load, where ``torch.bmm`` of the same shape stayed at 14-18 us)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    p = torch.softmax(head_products(qf, kf.transpose(1, 2)) * scale, dim=-1)
    return head_products(p, vf)


def head_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[H, M, K] x [H, K, N] -> [H, M, N]: ``torch.bmm``, or each head's ``a[h] @ b[h]``
    below 400 multiply-adds a product (where bmm runs a loop of its own that rounds
    otherwise).

    One head's bmm gives the numbers of ``a[0] @ b[0]`` (checked at 1-16 rows, head dims
    64-256, 1-4096 keys). For several
    heads MKL picks its batched kernel by shape: per head the same numbers at the embedded
    models' shapes (SmolLM2: 3 query heads per KV head, head dim 64, any length; Gemma 3:
    4 and 256 past one row), checked bit for bit in tests; at others (e.g. 5-7 or 9-11 rows
    of 64) within float32 rounding (at most 5.3e-5 on products up to 256 in magnitude)."""
    if a.shape[1] * a.shape[2] * b.shape[2] < 400:
        return torch.stack([x @ y for x, y in zip(a, b, strict=True)])
    return torch.bmm(a, b)
