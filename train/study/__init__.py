"""Sweeping many runs: the sweep, one cell, latency, the report and its statistics."""
