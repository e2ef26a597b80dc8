"""Head-aware methods: each module registers its methods."""

from methods.headaware import compresskv, razor, taskkv  # noqa: F401
