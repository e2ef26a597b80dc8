"""Byte accounting: the one rule every store, the full-cache reference and every view use.

Bytes are counted as a serving system holds them, whatever precision kvlens computes in (the
CPU runs the model in float32): full-precision keys, values and any floating per-token state at
the serving precision (16-bit, ``SERVING_FLOAT_BYTES``; bf16/fp16 on a GPU), quantisation codes
at their packed width, scales and zero points as stored (float16), and indices and positions
at their integer width. A floating tensor narrower than 16 bits (an fp8 code) counts as stored.
"""

from __future__ import annotations

import torch

#: bytes per element of a full-precision (floating) tensor as a server holds it
SERVING_FLOAT_BYTES = 2
SERVING_NOTE = "bytes as a 16-bit server holds them (codes, scales and indices as stored)"


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes one element of ``dtype`` takes in a serving cache."""
    size = torch.empty(0, dtype=dtype).element_size()
    return min(size, SERVING_FLOAT_BYTES) if dtype.is_floating_point else size


def held_bytes(*tensors: torch.Tensor | None) -> int:
    """Serving bytes of the given tensors (None counts 0)."""
    return sum(0 if t is None else t.numel() * element_bytes(t.dtype) for t in tensors)
