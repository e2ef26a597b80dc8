"""1.x-bit KV quantisation (VidKV: "Plug-and-Play 1.x-Bit KV Cache Quantization for Video Large
Language Models", Tao et al. 2025).

Sub-2-bit on average through channel grouping. Per KV head, keys and values are quantised per
channel (one fp16 scale and zero point per channel over groups of ``group`` tokens; the paper
quantises values per channel too). The paper's *anomalous* channels get more bits: here they
are the channels with the widest range over the prompt (max - min, what sets the uniform
step), and ``anomalous_bits`` (2) go to as many of them as make the average come out at
``key_bits`` / ``value_bits``; the other channels get ``normal_bits`` (1). A fraction
``salient_values`` of the prompt's tokens, those with the highest normalised accumulated
attention (ZipCache's saliency, as kvlens has no visual-token semantics), keep their values in
16 bits: the paper's "targeted preservation" of salient tokens. The average bits name the codes
only; scales, zero points, channel indices and the preserved values are counted on top.

Codes: round-to-nearest on a uniform grid from the group's minimum to its maximum at 2 bits and
more; at 1 bit the two levels are the means of the group's entries below and above the group
mean (stored as the same fp16 zero point and step). Min/max levels at 1 bit lose most of the
signal: KL 4.5 against 2.4 at groups of 128 on a 300-token SmolLM2 prompt (0.23 at groups of
32, the default).

Departures: the 1-bit levels above; no FFT of the normal key channels before 1-bit
quantisation; no 1.58-bit (ternary) value format (``value_bits=1.58`` instead puts 58% of the
value channels at 2 bits); channels are chosen from the prompt itself, per layer and KV head,
not offline. Later tokens stay in full precision.

The packed-code kernels hold 2, 4 and 8-bit codes only, so this method runs through the exact
reference path: its Encoding rebuilds dequantised K/V for attention and counts the codes at
their true bit width (ceil(n * bits / 8) bytes; kvlens keeps them unpacked in uint8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.eviction.base import group_mean
from methods.memory import held_bytes
from methods.registry import register


def code_bytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits packed densely."""
    return math.ceil(n * bits / 8)


def quantize_channels(x: torch.Tensor, bits: int, group: int):
    """Asymmetric round-to-nearest of x [L, C] per channel over groups of ``group`` tokens
    (the rule of methods.quant at any width 2..8; at 1 bit the levels are the means below and
    above the group mean): codes uint8 [L, C], step and lowest level fp16 [ceil(L / group), C]."""
    n, c = x.shape
    if n == 0 or c == 0:
        empty = x.new_zeros(math.ceil(n / group), c, dtype=torch.float16)
        return x.new_zeros(n, c, dtype=torch.uint8), empty, empty.clone()
    xf = x.float()
    pad = (-n) % group
    if pad:  # repeating the last row changes no group's minimum or maximum
        xf_p = torch.cat([xf, xf[-1:].expand(pad, -1)])
    else:
        xf_p = xf
    grid = xf_p.view(-1, group, c)
    if bits == 1:  # two levels: the means of the entries below and above the group's mean
        mean = xf.new_zeros(grid.shape[0], c)
        for i in range(grid.shape[0]):  # the real rows of each group (no padding)
            mean[i] = xf[i * group : (i + 1) * group].mean(0)
        mean_r = mean.repeat_interleave(group, 0)[:n]
        above = xf >= mean_r
        lo, hi = [], []
        for i in range(grid.shape[0]):
            rows = slice(i * group, (i + 1) * group)
            part, up = xf[rows], above[rows]
            count_up = up.sum(0)
            count_dn = (~up).sum(0)
            mean_up = (part * up).sum(0) / count_up.clamp_min(1)
            mean_dn = (part * ~up).sum(0) / count_dn.clamp_min(1)
            lo.append(torch.where(count_dn > 0, mean_dn, mean_up))
            hi.append(torch.where(count_up > 0, mean_up, mean_dn))
        lo = torch.stack(lo).half()
        hi = torch.stack(hi).half()
    else:
        lo = grid.amin(1).half()
        hi = grid.amax(1).half()
    step = ((hi.float() - lo.float()) / (2**bits - 1)).clamp_min(1e-8).half()
    ok = step.float() > 0
    lo_r = lo.float().repeat_interleave(group, 0)[:n]
    st_r = step.float().repeat_interleave(group, 0)[:n]
    ok_r = ok.repeat_interleave(group, 0)[:n]
    codes = torch.round((xf - lo_r) / torch.where(ok_r, st_r, 1.0))
    codes = torch.where(ok_r, codes.clamp(0, 2**bits - 1), 0).to(torch.uint8)
    return codes, step, lo


def dequantize_channels(codes, step, lo, group: int) -> torch.Tensor:
    n, c = codes.shape
    full = n // group * group  # rows in whole groups, then the last partial group
    out = torch.empty(n, c, device=codes.device)
    if out.numel() == 0:
        return out
    out[:full] = (
        codes[:full].view(-1, group, c).float() * step[: full // group, None].float()
        + lo[: full // group, None].float()
    ).view(full, c)
    if full < n:
        out[full:] = codes[full:].float() * step[-1].float() + lo[-1].float()
    return out


@dataclass
class ChannelGroups:
    """One tensor [L, D] with its widest channels at ``high`` bits and the rest at ``low``."""

    high_index: torch.Tensor  # int32 [n_high] channels at the high width
    tiers: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]  # (bits, codes, step, lo)
    group: int
    n_channels: int

    def rebuild(self) -> torch.Tensor:
        hi = self.high_index.long()
        is_hi = torch.zeros(self.n_channels, dtype=torch.bool, device=hi.device)
        is_hi[hi] = True
        order = torch.cat([hi, torch.nonzero(~is_hi).flatten()])  # the tiers' channels
        parts = [dequantize_channels(c, st, lo, self.group) for _b, c, st, lo in self.tiers]
        # gather back to channel order (index_select, much faster than an index_put)
        return torch.cat(parts, 1).index_select(1, torch.argsort(order))

    def nbytes(self) -> int:
        total = held_bytes(self.high_index)
        for bits, codes, step, lo in self.tiers:
            total += code_bytes(codes.numel(), bits) + held_bytes(step, lo)
        return total


def split_channels(x: torch.Tensor, avg_bits: float, low: int, high: int, group: int):
    """Quantise x [L, D]: the round((avg - low) / (high - low) * D) widest channels (max - min
    over the tokens) at ``high`` bits, the others at ``low``."""
    d = x.shape[1]
    share = 0.0 if high == low else (avg_bits - low) / (high - low)
    n_high = round(share * d)
    width = x.float().amax(0) - x.float().amin(0)
    high_index = torch.sort(torch.topk(width, n_high).indices).values
    is_hi = torch.zeros(d, dtype=torch.bool, device=x.device)
    is_hi[high_index] = True
    low_index = torch.nonzero(~is_hi).flatten()
    tiers = [
        (high, *quantize_channels(x[:, high_index], high, group)),
        (low, *quantize_channels(x[:, low_index], low, group)),
    ]
    return ChannelGroups(high_index.to(torch.int32), tiers, group, d)


@dataclass
class OneXBit:
    key: ChannelGroups
    value: ChannelGroups  # over the rows that are not preserved
    kept_rows: torch.Tensor  # int32 rows whose values stay in 16 bits
    kept_values: torch.Tensor  # float16 [n_kept, D]
    pos: torch.Tensor

    def keys(self):
        return self.key.rebuild()

    def values(self):
        n = self.pos.numel()
        rows = self.kept_rows.long()
        rest = torch.ones(n, dtype=torch.bool, device=rows.device)
        rest[rows] = False
        order = torch.cat([torch.nonzero(rest).flatten(), rows])
        both = torch.cat([self.value.rebuild(), self.kept_values.float()])
        return both.index_select(0, torch.argsort(order))

    def positions(self):
        return self.pos

    def nbytes(self):
        return (
            self.key.nbytes()
            + self.value.nbytes()
            + held_bytes(self.kept_rows, self.kept_values, self.pos)
        )


@register
@dataclass
class VidKV(PromptEncoder):
    key_bits: float = 1.5
    value_bits: float = 1.5
    normal_bits: int = 1
    anomalous_bits: int = 2
    group: int = 32
    salient_values: float = 0.02

    name: ClassVar[str] = "vidkv"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = (
        "Tao et al. 2025, Plug-and-Play 1.x-Bit KV Cache Quantization for Video Large "
        "Language Models (VidKV)"
    )
    summary: ClassVar[str] = (
        "1.x-bit: per-channel codes, widest channels at 2 bits, the rest at 1 bit"
    )

    def validate(self) -> None:
        for name in ("normal_bits", "anomalous_bits"):
            bits = getattr(self, name)
            require(1 <= bits <= 8, self.name, f"{name} must be in 1..8, got {bits}")
        lo, hi = self.normal_bits, self.anomalous_bits
        require(lo <= hi, self.name, f"normal_bits={lo} must be <= anomalous_bits={hi}")
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            require(
                lo <= bits <= hi,
                self.name,
                f"{name} must be in [normal_bits, anomalous_bits] = [{lo}, {hi}], got {bits}",
            )
        require(self.group >= 1, self.name, f"group must be >= 1, got {self.group}")
        require(
            0.0 <= self.salient_values <= 1.0,
            self.name,
            f"salient_values must be in [0, 1], got {self.salient_values}",
        )

    def encode_head(self, obs, head, keys, values, positions):
        lo, hi, g = self.normal_bits, self.anomalous_bits, self.group
        n = positions.numel()
        n_kept = round(self.salient_values * n)
        if n_kept:
            seen = (obs.n_seen - positions.long()).clamp_min(1).float()
            saliency = group_mean(obs.received[head]) / seen
            kept = torch.sort(torch.topk(saliency, n_kept).indices).values
        else:
            kept = torch.empty(0, dtype=torch.long, device=keys.device)
        rest = torch.ones(n, dtype=torch.bool, device=keys.device)
        rest[kept] = False
        return OneXBit(
            split_channels(keys, self.key_bits, lo, hi, g),
            split_channels(values[rest], self.value_bits, lo, hi, g),
            kept.to(torch.int32),
            values[kept].half(),
            positions.clone(),
        )
