"""Probes: load models, capture attention and KV in one forward pass, Traces and dumps."""

from probes.capture import capture
from probes.errors import DumpError, KvlensError
from probes.models import DEFAULT_MODEL, list_models, load_model, model_facts
from probes.trace import Trace

__all__ = [
    "DEFAULT_MODEL",
    "DumpError",
    "KvlensError",
    "Trace",
    "capture",
    "list_models",
    "load_model",
    "model_facts",
]
