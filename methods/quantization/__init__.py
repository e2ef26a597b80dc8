"""The quantisation family: each module registers one method."""

from methods.quantization import gear, int8, kivi, kvquant, mixed, rotatekv  # noqa: F401
