"""The merging family: each module registers one method."""

from methods.merging import d2o, minicache  # noqa: F401
