"""The eviction family: each module registers one method."""

from methods.eviction import (  # noqa: F401
    adakv,
    compactor,
    expected_attention,
    gemfilter,
    h2o,
    keydiff,
    keyformer,
    knorm,
    kvcrush,
    kvzip,
    pyramidkv,
    random_keep,
    recent,
    scissorhands,
    snapkv,
    streamingllm,
    tova,
)
