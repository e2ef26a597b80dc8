"""The low-rank / channel family: each module registers one method."""

from methods.lowrank import cskv, headpca, matryoshka, svd, think, xkv  # noqa: F401
