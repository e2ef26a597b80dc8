"""What the Compression lab needs to offer a method's parameters as widgets: a help line per
parameter, the allowed values of enumerations, and checks of the parameters against each
other and against the trace (a window longer than the prompt, or than the budget that must
hold it, is refused before minutes of work instead of after). The methods' own ``validate``
still runs when the spec is built; these checks only add what depends on the prompt."""

from __future__ import annotations

from methods.eviction.base import AVERAGES, SCHEDULES
from methods.eviction.expected_attention import SOFTMAX
from methods.eviction.gemfilter import POSITIONS
from methods.eviction.h2o import NORMALISATIONS
from methods.eviction.kvcrush import ANCHORS
from methods.eviction.kvzip import ALLOCATIONS, LEVELS, NORMALISE
from methods.headaware.taskkv import SCOPES
from probes.errors import KvlensError

CHOICES: dict[str, tuple[str, ...]] = {
    "pooling": ("max", "avg"),
    "schedule": SCHEDULES,
    "normalise": NORMALISATIONS,
    "average": AVERAGES,
    "key_grouping": ("channel", "token"),
    "anchor": ANCHORS,
    "positions": POSITIONS,
    "scope": SCOPES,
    "pool": ("max", "mean"),
    "allocate": ("adaptive", "uniform"),
    "level": LEVELS,
    "allocation": ALLOCATIONS,
    "group_pool": ("norm", "square"),
}

HELP: dict[str, str] = {
    "budget": "prompt tokens each KV head keeps (a count of tokens, not bytes)",
    "window": "the last prompt tokens: their queries score the others and they are always kept",
    "kernel": "width of the pooling over neighbouring scores (odd), so kept tokens come in runs",
    "pooling": "how neighbouring scores are pooled: max or average",
    "sinks": "first tokens always kept (attention sinks, StreamingLLM)",
    "recent": "newest tokens always kept; -1 means half the budget",
    "schedule": "prefill: evict once after the prompt; continuous: also at every new token",
    "normalise": "sum: accumulated attention (H2O); mean: divided by how many queries saw it",
    "average": "average attention over the query heads of a KV group, or of the whole layer",
    "history": "decoding steps over which importance is counted (Scissorhands)",
    "bits": "bit width of the quantised codes",
    "group": "tokens (or channels) sharing one scale and zero point",
    "residual": "newest tokens kept in 16 bits until a full group can be quantised",
    "key_grouping": "quantise keys per channel (outlier channels) or per token",
    "outliers": "fraction of values kept exactly as outliers",
    "rank": "rank of the low-rank approximation",
    "value_rank": "rank for values; -1 uses the key rank",
    "prune": "fraction of key channels dropped",
    "heads": "fraction of heads kept whole (retrieval heads; Task-KV: heterogeneous heads)",
    "scores": "head profile file with retrieval scores; empty = measure them",
    "floor": "share of the budget every head gets before the rest is shared out",
    "beta": "how steeply budgets fall from lower to higher layers",
    "threshold": "similarity above which tokens or layers are merged",
    "start": "first layer merged with the one before; -1 = the second half",
    "salient": "fraction of tokens stored at the high bit width",
    "high_bits": "bit width of salient tokens",
    "low_bits": "bit width of the other tokens",
    "tau": "temperature of the Gumbel noise on the scores",
    "seed": "random seed",
    "alpha": "weight of the global (accumulated) score against the local (window) score",
    "centres": "fraction of the budget spent on merged centres of evicted tokens",
    "merge": "kept tokens each evicted value is spread over",
    "sample": "draw each merge at random (the paper) or merge its expected share",
    "chunk": "tokens per chunk in which similar keys are matched and merged",
    "proportional": "centroids attend as the tokens they merged (log size added to the logit)",
    "crush": "fraction of the budget kept as representatives of the evicted tokens",
    "anchor": "reference vector the head-behaviour bits are compared to",
    "heads_per_layer": "retrieval heads per layer whose votes choose every head's tokens",
    "profile": "retrieval-heads or head-profile parquet; empty = measure echo + induction",
    "layer": "the early layer whose last query picks the tokens; -1 = 40% of the depth",
    "positions": "renumber the kept tokens 0..k-1 (the paper) or keep their prompt positions",
    "scope": "rank heads within each layer, or across the whole model",
    # Expected Attention, KVzip, ThinK
    "future": "how many positions ahead the future queries' statistics are carried",
    "covariance": "use the future queries' covariance as well as their mean",
    "vnorm": "weight each key's expected attention by its value's norm",
    "ratio": "share of the cache kept (of KV pairs, or of heads at level=head)",
    "level": "rank single KV pairs (pair) or whole heads (head)",
    "allocation": "keep the top ratio over all layers and heads (global), per layer or per head",
    "sketch": "rows of the Gaussian sketch for approximate leverage scores; 0 = exact",
    "group_pool": "how a KV head pools its query group's channel norms: norm or square (kvpress)",
    # the sparse family (the whole cache kept; budget = tokens each KV head reads per step)
    "page": "tokens per page; a step reads whole pages",
    "pool": "how a KV group's query heads pool their scores: max or mean",
    "dense_layers": "first layers that read every token (Quest leaves two dense)",
    "clusters": "k-means clusters of the context's keys per KV head",
    "iters": "k-means iterations",
    "normalize": "cluster unit-normalised keys (cosine), as the paper's code does",
    "local": "the prompt's last tokens, always read exactly",
    # 1.x-bit (VidKV), block floating point, COMET
    "key_bits": "average bits per key code (anomalous channels high, the rest low)",
    "value_bits": "average bits per value code (anomalous channels high, the rest low)",
    "normal_bits": "bit width of the normal channels",
    "anomalous_bits": "bit width of the anomalous (widest-range) channels",
    "salient_values": "fraction of tokens (most attended) whose values stay in 16 bits",
    "mantissa": "bits per entry, sign included, under a block's shared exponent",
    "block": "channels sharing one exponent",
    "rearrange": "sort channels by magnitude so outlier channels share blocks",
    "outlier_bits": "bit width of the widest-range groups",
    "outlier_groups": "share of groups (the widest range) stored at outlier_bits",
    # channel / head compression (CSKV, KV-head PCA, MatryoshkaKV)
    "heads_merged": "consecutive KV heads merged into one by PCA (the last group may be smaller)",
    "allocate": "ranks per head: uniform (all the same) or adaptive (shared out by energy)",
    # ActQKV, A^2ATS (sparse family)
    "windowed": "score far keys at one fixed RoPE distance (windowed RoPE) instead of their own",
    "query_aware": "k-means under the prompt queries' metric (query-aware VQ), not plain distance",
    "calib": "the prompt's last queries that estimate the query metric of the codebook",
    "segment": "generated tokens per retrieval unit (consecutive, summarised by their mean key)",
}

# where a parameter means something else in one method, that method's own help
METHOD_HELP: dict[tuple[str, str], str] = {
    ("cskv", "window"): "newest tokens kept at full precision beside the low-rank features",
    ("kvzip", "normalise"): "softmax of the replay over the chunk and sinks (chunk) or the "
    "whole context (full)",
    ("expected_attention", "softmax"): "expected attention normalised over all keys (all) or "
    "over the keys after the sinks (after_sinks, kvpress)",
    ("actqkv", "window"): "recent queries (the current one included) the probe query is built from",
    ("actqkv", "local"): "newest tokens always read (counted in the budget)",
    ("louiskv", "threshold"): "query similarity to the last retrieval's below which it retrieves",
    ("louiskv", "local"): "newest tokens always read",
}
METHOD_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("kvzip", "normalise"): NORMALISE,
    ("expected_attention", "softmax"): SOFTMAX,
}


def choices_for(method: str, param: str) -> tuple[str, ...] | None:
    """The allowed values of one method's enumerated parameter, None if it is free."""
    return METHOD_CHOICES.get((method, param), CHOICES.get(param))


def help_for(method: str, param: str) -> str | None:
    """The help text of one method's parameter: the method's own where it has one."""
    return METHOD_HELP.get((method, param), HELP.get(param))


# parameters counted in prompt tokens
TOKEN_COUNTS = ("budget", "window", "sinks", "recent", "residual", "history")
# methods whose window counts recent queries, not tokens the cache must keep
WINDOW_OF_QUERIES = ("actqkv",)


def check_against_trace(name: str, params: dict, n_prompt: int) -> list[str]:
    """Problems of one method's parameters for a prompt of ``n_prompt`` tokens ([] if none).

    Raises KvlensError for settings that contradict each other (a window the budget cannot
    hold); returns notes for settings that run but change little on this prompt (a budget
    of at least the prompt's length keeps every token).
    """
    notes = []
    for key in TOKEN_COUNTS:
        value = params.get(key)
        if isinstance(value, int) and value >= n_prompt and key != "budget":
            notes.append(f"{name}: {key}={value} covers the whole {n_prompt}-token prompt")
    budget, window = params.get("budget"), params.get("window")
    kept_window = name not in WINDOW_OF_QUERIES  # a window of kept tokens must fit the budget
    if kept_window and isinstance(budget, int) and isinstance(window, int) and window > budget:
        raise KvlensError(
            f"{name}: window={window} must be <= budget={budget} (the window is always kept)"
        )
    sinks = params.get("sinks")
    if isinstance(budget, int) and isinstance(sinks, int) and sinks >= budget:
        raise KvlensError(f"{name}: sinks={sinks} must be < budget={budget}")
    if isinstance(budget, int) and budget >= n_prompt:
        notes.append(
            f"{name}: budget={budget} >= the prompt's {n_prompt} tokens, so nothing is evicted"
        )
    return notes
