"""Gathered-offset attention: forward and backward, GPU (Triton) and TPU (Mosaic)."""
