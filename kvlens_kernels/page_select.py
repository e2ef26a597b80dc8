"""The top-k pages per KV head from their Quest bounds, without a sort (the selection half of
Quest's page-sparse decoding: Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference").

Input: bounds [B, Hkv, N] (any float dtype; ``kvlens_kernels.page_bounds`` writes float32).
Output: int32 [B, Hkv, min(k, N)], per KV head the indices of its k largest bounds in
**ascending index order** (attention does not care about the order; ascending is what
``methods.base.Selection`` asks for). Exactly min(k, N) pages are chosen: among pages whose bound
equals the k-th largest, the lowest indices are taken, so the result is deterministic and
equals the set ``torch.topk`` picks whenever the bounds are distinct. ``force_last`` puts page
N - 1 (Quest's current, partial page) first in the ranking, so it is always chosen.
Ordering of special values, as ``torch.sort`` has it: -0.0 equals 0.0, NaN ranks above +inf.

The kernel runs one program per (batch, KV head) with the whole row of bounds in registers
(up to ``MAX_PAGES``). Each bound becomes an int32 key whose integer order is the float order
(the sign bit flipped in, negatives mirrored). A search over the key range keeps ``lo`` with
count(key >= lo) >= k and ``hi`` with count(key >= hi) < k; each pass counts the keys at or
above ``PROBES`` evenly spaced points of (lo, hi) in one reduction and narrows to the interval
that holds the k-th key. It stops once some probe has exactly k keys at or above it (random
bounds: after about log_(PROBES+1)(N) passes, no fixed 32 passes of a radix select), or when
hi = lo + 1, where every key in [lo, hi) equals lo (ties). Then every key >= hi is taken, and
of the keys in [lo, hi) the first k - count(>= hi) in index order (a prefix sum); a second
prefix sum over the chosen lanes gives each its output slot (a compaction, order kept).

File order: kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

import torch

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

#: most pages per head the kernel holds in registers (256k tokens at pages of 16); longer rows
#: go to the reference (a stable sort) on any device
MAX_PAGES = 16384

if triton is not None:

    @triton.jit
    def choose_pages(x, offs, N, KK, PROBES: tl.constexpr, FORCE_LAST: tl.constexpr):
        """Page selection as ``kvlens_kernels.page_select`` defines it, for one row of bounds
        ``x`` (float32 over lanes ``offs``, lanes >= N padding): returns (chosen, slot), the
        KK = min(k, N) chosen lanes and each one's rank in ascending index order.

        Each bound becomes an int32 key whose integer order is the float order (-0.0 = 0.0,
        every NaN one key above +inf, a forced last page above all). The search keeps
        count(key >= lo) >= KK > count(key >= hi), counting at PROBES points of (lo, hi) per
        pass, until a probe has exactly KK keys at or above it or hi = lo + 1. Then the keys
        >= hi are chosen, and of the keys in [lo, hi) (all equal to lo unless a probe met KK
        exactly) the first KK - count(key >= hi) in index order."""
        valid = offs < N
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negatives mirrored below zero
        key = tl.where(key == -1, 0, key)  # -0.0 is 0.0
        key = tl.where(x == x, key, 0x7FC00000)  # NaN: above +inf's 0x7F800000
        if FORCE_LAST:
            key = tl.where(offs == N - 1, 0x7FFFFFFF, key)
        key = tl.where(valid, key, -0x7FFFFFFF - 1)  # padding below every real key
        lo = tl.min(tl.where(valid, key, 0x7FFFFFFF), 0).to(tl.int64)
        hi = tl.max(key, 0).to(tl.int64) + 1  # may be 2**31: int64
        n_lo = tl.sum(valid.to(tl.int32), 0)  # count(key >= lo)
        n_hi = n_lo * 0  # count(key >= hi)
        steps = (tl.arange(0, PROBES) + 1).to(tl.int64)
        while (n_lo != KK) & (hi - lo > 1):
            probe = lo + (hi - lo) * steps // (PROBES + 1)  # in [lo, hi), the last > lo
            counts = tl.sum((key[None, :] >= probe.to(tl.int32)[:, None]).to(tl.int32), 1)
            enough = counts >= KK
            next_lo = tl.max(tl.where(enough, probe, lo), 0)
            n_lo = tl.min(tl.where(enough, counts, n_lo), 0)
            hi = tl.min(tl.where(enough, hi, probe), 0)
            n_hi = tl.max(tl.where(enough, n_hi, counts), 0)
            lo = next_lo
        above = key > (hi - 1).to(tl.int32)  # hi - 1 <= the largest key: fits int32
        level = valid & (key >= lo.to(tl.int32)) & ~above  # all equal to lo unless n_lo == KK
        chosen = above | (level & (tl.cumsum(level.to(tl.int32), 0) <= KK - n_hi))
        slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
        return chosen, slot

    @triton.jit
    def _page_select_kernel(
        BOUNDS, OUT, N, K,
        BLOCK: tl.constexpr, PROBES: tl.constexpr, FORCE_LAST: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x = tl.load(BOUNDS + row.to(tl.int64) * N + offs, mask=offs < N, other=0.0)
        chosen, slot = choose_pages(x.to(tl.float32), offs, N, K, PROBES, FORCE_LAST)
        tl.store(OUT + row.to(tl.int64) * K + slot, offs, mask=chosen)  # K = min(k, N)


def select_warps(block: int) -> int:
    """Warps for a row of ``block`` lanes: about 16 lanes a thread, 4 to 16 warps."""
    return max(4, min(16, block // 512))


def page_select_triton(
    bounds: torch.Tensor, k: int, *, force_last: bool = False, probes: int = 4,
    num_warps: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launch one program per (batch, KV head); ``probes`` (a power of two) points per pass."""
    *lead, n = bounds.shape
    kk = min(k, n)
    rows = bounds.reshape(-1, n).contiguous()
    out = torch.empty(*lead, kk, device=bounds.device, dtype=torch.int32)
    if rows.shape[0] == 0 or kk == 0:
        return out
    block = max(16, triton.next_power_of_2(n))
    extra = {} if bounds.device.type == "cpu" else {"num_warps": num_warps or select_warps(block)}
    _page_select_kernel[(rows.shape[0],)](
        rows, out, n, kk, BLOCK=block, PROBES=probes, FORCE_LAST=force_last, **extra
    )
    return out


def page_select_reference(
    bounds: torch.Tensor, k: int, *, force_last: bool = False
) -> torch.Tensor:
    """The k best pages by a stable descending sort (ties: lowest index first), the forced last
    page ahead of all, then ascending: int32 [..., min(k, N)]."""
    n = bounds.shape[-1]
    kk = min(k, n)
    order = torch.sort(bounds.float(), dim=-1, descending=True, stable=True).indices
    if force_last and n:
        lastfirst = torch.sort((order == n - 1).int(), dim=-1, descending=True, stable=True)
        order = torch.gather(order, -1, lastfirst.indices)
    return order[..., :kk].sort(dim=-1).values.to(torch.int32)


def kernel_applies(bounds: torch.Tensor) -> bool:
    """The Triton path needs CUDA and at most ``MAX_PAGES`` pages per head."""
    return bounds.is_cuda and triton is not None and bounds.shape[-1] <= MAX_PAGES


def page_select(bounds: torch.Tensor, k: int, *, force_last: bool = False) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere."""
    if kernel_applies(bounds):
        with torch.cuda.device(bounds.device):  # Triton launches on the current device
            return page_select_triton(bounds, k, force_last=force_last)
    return page_select_reference(bounds, k, force_last=force_last)
