"""The architecture matrix, probe side: each family's tiny random-weight model through capture.

For every family (tests/architectures.py): the attention kvlens records equals the model's own
eager attention (``output_attentions``), post-RoPE keys are the model's rotary embedding
applied to the recorded pre-RoPE keys (partial rotary and fused q/k/v projections included),
and a dump reads back equal.
Families kvlens cannot serve raise one clear line.
"""

from __future__ import annotations

import pytest
import torch

from probes import KvlensError, Trace, capture, model_facts
from tests.architectures import FAMILIES, apply_rope, eager_attentions, tiny_model
from tests.conftest import passage

PROBED = [f for f in FAMILIES if f != "deepseek_v3"]
NO_KEY_PROJECTION = ("gpt2",)  # a fused c_attn of its own layout (and no RoPE at all)
N_TOKENS = 40  # longer than the windowed families' window of 16


@pytest.fixture(scope="module")
def prompt_ids(smol):
    return smol[1](passage(1))["input_ids"][:N_TOKENS]


@pytest.fixture(scope="module")
def traces(smol, prompt_ids):
    return {f: capture(tiny_model(f), smol[1], prompt_ids, attention="full") for f in PROBED}


@pytest.mark.parametrize("family", PROBED)
def test_probe_attention_equals_eager(family, traces, prompt_ids):
    trace = traces[family]
    eager = eager_attentions(tiny_model(family), prompt_ids)
    assert len(eager) == trace.model.n_layers
    for layer, want in enumerate(eager):
        # full maps are kept as float16
        torch.testing.assert_close(trace.attn(layer).float(), want, atol=1e-3, rtol=0)
        received = trace.key_stats.filter(layer=layer).sort("head", "position")["received"]
        got = torch.tensor(received.to_numpy()).view(want.shape[0], -1)
        torch.testing.assert_close(got, want.sum(1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", [f for f in PROBED if f not in NO_KEY_PROJECTION])
def test_post_rope_keys_are_the_rotated_pre_rope_keys(family, traces):
    trace, model = traces[family], tiny_model(family)
    assert trace.model.pre_rope_keys
    for layer in range(trace.model.n_layers):
        pre, post = trace.key_pre_rope(layer), trace.key(layer)
        assert pre.shape == post.shape == (trace.model.n_kv_heads, N_TOKENS, trace.model.head_dim)
        assert not torch.allclose(pre, post, atol=1e-3)  # RoPE moved them
        rotated = apply_rope(model, layer, pre)
        torch.testing.assert_close(rotated, post.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["phi", "gpt_neox"])
def test_partial_rotary_leaves_the_unrotated_channels_alone(family, traces):
    trace = traces[family]
    attn = next(m for m in tiny_model(family).modules() if hasattr(m, "rotary_ndims"))
    assert 0 < attn.rotary_ndims < trace.model.head_dim
    pre, post = trace.key_pre_rope(0), trace.key(0)
    assert torch.equal(pre[..., attn.rotary_ndims :], post[..., attn.rotary_ndims :])
    assert not torch.allclose(pre[..., : attn.rotary_ndims], post[..., : attn.rotary_ndims])


def test_without_a_hookable_key_projection_the_trace_says_why(traces):
    trace = traces["gpt2"]
    assert not trace.model.pre_rope_keys
    assert trace.key(0).shape[-1] == trace.model.head_dim  # keys as attention saw them
    with pytest.raises(KvlensError, match="no key projection kvlens can hook") as err:
        trace.key_pre_rope(0)
    assert "\n" not in str(err.value)


def test_latent_attention_is_refused_in_one_line():
    with pytest.raises(KvlensError, match="multi-head latent attention") as err:
        tiny_model("deepseek_v3")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", PROBED)
def test_dump_round_trip(family, traces, tmp_path):
    trace = traces[family]
    back = Trace.load(trace.save(tmp_path / family))
    assert back.model == trace.model == model_facts(tiny_model(family))
    assert back.tensors.keys() == trace.tensors.keys()
    for name, t in trace.tensors.items():
        assert torch.equal(back.tensors[name], t), name
    assert back.key_stats.equals(trace.key_stats)
    assert back.query_stats.equals(trace.query_stats)
