"""Head-aware methods: each module registers its methods."""

from methods.headaware import razor  # noqa: F401
