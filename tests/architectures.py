"""Tiny random-weight models of the architecture families kvlens is tested on.

Each is built in memory from its transformers config class (no download): two to four layers,
hidden size 64, with the features that set the family apart kept on (sliding windows, logit
soft-capping, q/k norms, fused projections, partial rotary, latent attention). Weights are
random but seeded, so a test sees the same model every run. The tokenizer is SmolLM2's, so
prompts are real text.
"""

from __future__ import annotations

import functools
import inspect

import torch

VOCAB = 49152  # SmolLM2's tokenizer
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
WINDOW = 16  # sliding window of the windowed families: shorter than the test prompts
ALTERNATING = ["sliding_attention", "full_attention"]


def _configs() -> dict[str, tuple[str, dict]]:
    """Family -> (config class, model class, keyword arguments).

    ``phi`` (Phi-1/2) has a separate key projection and rotates half of each head's channels:
    the partial-rotary family whose pre-RoPE keys kvlens can hook. ``gpt_neox`` rotates a
    quarter, through a fused q/k/v projection. ``gpt2`` has learned absolute positions (no
    RoPE) and a fused ``c_attn``: the family without a key projection kvlens can hook.
    """
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {**SMALL}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {**SMALL, "sliding_window": WINDOW}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**SMALL}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 16}),
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            {
                **SMALL,
                "head_dim": 16,
                "sliding_window": WINDOW,
                "layer_types": ALTERNATING,
                "attn_logit_softcapping": 20.0,
                "final_logit_softcapping": 30.0,
                "query_pre_attn_scalar": 16,
            },
        ),
        "gemma3": (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {
                **SMALL,
                "head_dim": 16,
                "sliding_window": WINDOW,
                "layer_types": ALTERNATING,
                "query_pre_attn_scalar": 16,
            },
        ),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {**SMALL, "pad_token_id": 0}),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**SMALL, "eos_token_id": 2}),
        "phi": ("PhiConfig", "PhiForCausalLM", {**SMALL, "partial_rotary_factor": 0.5}),
        "gpt_neox": (
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            {
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 512,
                "rotary_pct": 0.25,
            },
        ),
        "gpt2": (
            "GPT2Config",
            "GPT2LMHeadModel",
            {
                "vocab_size": VOCAB,
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": 512,
                "bos_token_id": 0,
                "eos_token_id": 0,
            },
        ),
        "deepseek_v3": (
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            {
                **SMALL,
                "num_key_value_heads": 4,
                "q_lora_rank": 32,
                "kv_lora_rank": 32,
                "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8,
                "v_head_dim": 16,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_group": 1,
                "topk_group": 1,
                "moe_intermediate_size": 32,
                "first_k_dense_replace": 1,
            },
        ),
    }


FAMILIES = tuple(_configs())


@functools.cache
def tiny_model(family: str):
    """A seeded random-weight model of ``family`` in float32, wrapped for kvlens."""
    import transformers

    from probes.models import wrap_model

    config_name, model_name, kwargs = _configs()[family]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float().eval()
    return wrap_model(model, name=f"tiny-{family}")


def apply_rope(model, layer: int, keys: torch.Tensor) -> torch.Tensor:
    """The model's own rotary embedding applied to keys [Hkv, T, D] at positions 0..T-1."""
    rotary = model.base_model.rotary_emb
    positions = torch.arange(keys.shape[1])[None]
    args = [keys[None].float(), positions]
    if "layer_type" in inspect.signature(type(rotary).forward).parameters:
        args.append(model.config.layer_types[layer])
    with torch.no_grad():
        cos, sin = rotary(*args)
    r = cos.shape[-1]  # rotated channels: fewer than head_dim under partial rotary
    rot, rest = keys[..., :r].float(), keys[..., r:].float()
    half = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * cos[0] + half * sin[0], rest], dim=-1)


def eager_attentions(model, ids: list[int]) -> list[torch.Tensor]:
    """The model's own attention probabilities per layer ([Hq, T, T]), from eager attention."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("kvlens")
    return [a[0].float() for a in out.attentions]
