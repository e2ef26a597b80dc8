"""Analysis: pure functions from a Trace to polars DataFrames (no model runs here)."""
