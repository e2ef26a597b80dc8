"""Where each analysis view departs from the paper it reproduces: one sentence per view.

The app shows these as help text beside each view, so a reader knows which number is the
paper's and which setting gives the paper's. Keys are the analysis modules' names; each
module's docstring says the same at more length, and tests/analysis/test_references.py
checks every module against an independent computation of its stated definition.
"""

from __future__ import annotations

DEPARTURES: dict[str, str] = {
    "heavy_hitters": (
        "Tokens are ranked by default by received_norm (attention received divided by the "
        "number of queries that can see the token, so causal masking alone does not favour "
        "early tokens), where H2O ranks by the raw accumulated attention (the score "
        "by='received' restores it), and persistence is the mean Jaccard overlap of the "
        "top-k sets of consecutive decoding steps rather than Scissorhands' share of a "
        "history window's heavy tokens that stay heavy (no setting restores that)."
    ),
    "outliers": (
        "A channel is flagged as an outlier by a rule kvlens states (mean |x| at least "
        "ratio=4 times its head's median channel; KIVI and KVQuant show the magnitudes but "
        "set no such threshold), and the quantisation error quantises every token, with one "
        "min/max group over a token's whole head_dim for per-token grouping, where KIVI keeps "
        "the newest tokens that do not fill a group in full precision and splits a token's "
        "channels into groups of 32 (group sets only the per-channel token group)."
    ),
    "cross_layer": (
        "MiniCache's per-token cosine and magnitude ratio are averaged over every token and "
        "KV head for every pair of layers, where MiniCache merges only adjacent layers from "
        "mid-depth on and keeps the least similar tokens unmerged (read the adjacent=True "
        "rows for its pairs), and the UMAP view embeds at most max_points tokens, evenly "
        "spaced, when a prompt is longer."
    ),
    "head_types": (
        "The head types come from fixed thresholds kvlens states on the retrieval score, "
        "sink ratio, locality and normalised entropy (first match wins; listed in "
        "analysis.head_types), where DuoAttention learns a gate per head and RazorAttention "
        "keeps the top share of heads by echo and induction score; no setting reproduces "
        "either choice."
    ),
    "head_profiles": (
        "Profiles compare models by relative depth (layer / (layers - 1)) in bins=5 equal "
        "slices, a kvlens convention that no paper defines; the per-head measures are "
        "head_types' and the retrieval, echo and induction scores are retrieval_heads'."
    ),
}
