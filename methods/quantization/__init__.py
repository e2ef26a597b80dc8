"""The quantisation family: each module registers one method."""

from methods.quantization import (  # noqa: F401
    bfp,
    comet,
    gear,
    int8,
    kivi,
    kvquant,
    mixed,
    rotatekv,
    vidkv,
)
