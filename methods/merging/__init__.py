"""The merging family: each module registers one method."""

from methods.merging import cam, d2o, ems, kvcluster, minicache  # noqa: F401
