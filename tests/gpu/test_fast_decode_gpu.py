"""On CUDA: the fast decoder's step replayed from a CUDA graph gives, token for token, what the
same step gives run eagerly, and what the eager decode paths give up to a near-tie of their
logits (the full cache through transformers' DynamicCache, the compressed caches through
``methods.cache``'s kernel path, H2O and TOVA through its statistics path), for the full cache
and each kernel-backed method; on a small random Llama in float16."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SPECS = [
    None,
    "kivi:bits=2,group=32,residual=32",
    "kivi:bits=4,group=64,residual=64",
    "int8",
    "snapkv:budget=200,window=16",
    "h2o:budget=200",  # evicts at every step, scored on the device inside the graph
    "tova:budget=200",
    "streamingllm:budget=200",
]
NEW = 48  # tokens after the prefill's: the quantised stores quantise a group during them


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from probes.attention import register_kvlens_attention

    register_kvlens_attention()
    cfg = LlamaConfig(
        hidden_size=1024, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=2000, max_position_embeddings=4096,
    )  # fmt: skip
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.float16).eval()


def _cache(model, spec):
    from transformers import DynamicCache

    from methods.cache import CompressedCache
    from methods.registry import create

    return DynamicCache() if spec is None else CompressedCache(model, create(spec))


def _prefill(model, ids, cache):
    from probes.compat import cache_arg

    out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def _fast(model, ids, spec, graph: bool) -> list[int]:
    from methods.fast_decode import FastDecoder, decode_layers

    cache = _cache(model, spec)
    first = _prefill(model, ids, cache)
    decoder = FastDecoder(model, decode_layers(cache, NEW + 1), graph=graph)
    return decoder.generate(first, NEW).tolist()


def _eager(model, ids, spec) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the float32 logits that chose each."""
    from probes.compat import cache_arg

    cache = _cache(model, spec)
    tok = _prefill(model, ids, cache)
    tokens, logits = [], []
    for _ in range(NEW):
        out = model(input_ids=tok, **cache_arg(model, cache), use_cache=True)
        logits.append(out.logits[0, -1].float())
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
    return tokens, logits


def _same_up_to_a_near_tie(got: list[int], tokens: list[int], logits: list[torch.Tensor]):
    """``got`` equals the eager ``tokens``, or departs from them first at a step where the
    eager logits rank the two tokens within rounding of each other (random weights give
    near-uniform logits; a different attention kernel's rounding may flip such a tie, after
    which the two runs see different tokens and part)."""
    for i, (a, b) in enumerate(zip(got, tokens, strict=True)):
        if a != b:
            row = logits[i]
            gap = float(row[b] - row[a])
            assert gap <= 1e-2 * float(row.abs().max()), (i, a, b, gap)
            return


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s or "full")
def test_graph_decode_equals_the_eager_paths(llama, spec):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 2000, (1, 1500), generator=g).cuda()
    with torch.inference_mode():
        graph = _fast(llama, ids, spec, graph=True)
        eager_step = _fast(llama, ids, spec, graph=False)
        eager, logits = _eager(llama, ids, spec)
    assert graph == eager_step
    _same_up_to_a_near_tie(graph, eager, logits)
    assert len(set(graph)) > 1  # a model stuck on one token would prove little


def test_graph_decode_keeps_the_quantised_store_in_step(llama):
    """After the run, the store's host counts say what the eager path's say."""
    from methods.fast_decode import FastDecoder, decode_layers

    spec = "kivi:bits=2,group=32,residual=32"
    ids = torch.randint(0, 2000, (1, 1000), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        fast_cache, eager_cache = _cache(llama, spec), _cache(llama, spec)
        first = _prefill(llama, ids, fast_cache)
        before = fast_cache.layers[0].store.n_quant
        decoder = FastDecoder(llama, decode_layers(fast_cache, NEW + 1))
        decoder.generate(first, NEW)
        tok = _prefill(llama, ids, eager_cache)
        from probes.compat import cache_arg

        for _ in range(NEW):
            out = llama(input_ids=tok, **cache_arg(llama, eager_cache), use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for fast_layer, eager_layer in zip(fast_cache.layers, eager_cache.layers, strict=True):
        a, b = fast_layer.store, eager_layer.store
        assert (a.n_quant, a.n_residual) == (b.n_quant, b.n_residual)
        torch.testing.assert_close(a._kc[:, : a.n_quant], b._kc[:, : b.n_quant], rtol=0, atol=0)
    assert fast_cache.layers[0].store.n_quant > before  # groups quantised while decoding
    assert decoder.nbytes() == fast_cache.nbytes() == eager_cache.nbytes()


def test_graph_decode_of_a_sliding_window_model_equals_the_eager_path():
    """A small random Gemma 3 (sliding layers of window 64 beside full ones), its full cache
    past the window: the captured steps (rings of 64 rows on the sliding layers) give what the
    same steps give eagerly, and transformers' DynamicCache decode up to a near-tie."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from methods.fast_decode import FastDecoder, RingLayer, decode_layers, layer_windows
    from probes.attention import register_kvlens_attention

    register_kvlens_attention()
    cfg = Gemma3TextConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=128, vocab_size=2000, max_position_embeddings=4096,
        tie_word_embeddings=False, sliding_window=64,  # tied: greedy repeats its input
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )  # fmt: skip
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma3ForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.randint(0, 2000, (1, 300), generator=torch.Generator().manual_seed(4)).cuda()
    windows = layer_windows(model)
    assert windows == [64, 64, 64, None]
    runs = []
    with torch.inference_mode():
        for graph in (True, False):
            cache = _cache(model, None)
            first = _prefill(model, ids, cache)
            layers = decode_layers(cache, NEW + 1, windows)
            assert [isinstance(x, RingLayer) for x in layers] == [True] * 3 + [False]
            runs.append(FastDecoder(model, layers, graph=graph).generate(first, NEW).tolist())
        eager, logits = _eager(model, ids, None)
    assert runs[0] == runs[1]
    _same_up_to_a_near_tie(runs[0], eager, logits)
    assert len(set(runs[0])) > 1
