"""Gathered-offset attention in Pallas: GPU (Triton lowering) and TPU (Mosaic), fwd + bwd."""

from pallas_kernels.attention.ops import gathered_offset_attention

__all__ = ["gathered_offset_attention"]
