"""The quantisation family: each module registers one method."""

from methods.quantization import int8, kivi, rotatekv  # noqa: F401
