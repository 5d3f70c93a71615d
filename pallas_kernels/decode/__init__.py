"""Fused single-token decode kernels (GPU): sparse attention over a ring cache, projections, a block."""
