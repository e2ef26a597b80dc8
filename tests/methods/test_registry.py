"""Method specs: parsing, validation errors that name the problem, and the listing."""

from __future__ import annotations

import pytest

from methods.registry import available, create, split_specs
from probes import KvlensError

EVICTION = {
    "streamingllm",
    "h2o",
    "scissorhands",
    "tova",
    "snapkv",
    "pyramidkv",
    "keyformer",
    "adakv",
    "random",
    "recent",
}


def test_every_eviction_method_is_registered_with_a_paper():
    methods = available()
    assert EVICTION <= set(methods)
    for name, cls in methods.items():
        assert cls.paper and cls.summary and cls.family, name
        assert create(name).spec().startswith(name)


def test_spec_round_trips():
    m = create("snapkv:budget=256,window=16,pooling=avg")
    assert (m.budget, m.window, m.pooling) == (256, 16, "avg")
    assert create(m.spec()) == m
    assert create("full") is None


def test_split_specs_keeps_parameters_with_their_method():
    text = "full,snapkv:budget=128,window=32,h2o:budget=64"
    assert split_specs(text) == ["full", "snapkv:budget=128,window=32", "h2o:budget=64"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch:budget=3", "unknown method 'nosuch'"),
        ("snapkv:budget=0", "budget must be >= 1"),
        ("snapkv:window=-2", "window must be >= 1"),
        ("h2o:budget=64,colour=red", "unknown parameter 'colour'"),
        ("h2o:budget=many", "parameter 'budget' must be int"),
        ("snapkv:kernel=4", "kernel must be odd"),
        ("streamingllm:budget=4,sinks=4", "sinks (4) must be < budget (4)"),
        ("snapkv:budget", "parameters are key=value"),
        ("full:budget=3", "full takes no parameters"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_problem(spec, message):
    with pytest.raises(KvlensError) as info:
        create(spec)
    assert message in str(info.value) and "\n" not in str(info.value)
