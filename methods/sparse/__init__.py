"""The sparse-attention / KV-retrieval family: the whole cache is kept, each decoding step
reads a selected part. Each module registers one method."""

from methods.sparse import (  # noqa: F401
    a2ats,
    actqkv,
    louiskv,
    oracle,
    quest,
    random_pages,
    shadowkv,
    squeezed,
)
