"""Gathered-offset attention in Pallas: GPU (Triton lowering) and TPU (Mosaic), fwd + bwd."""

from pallas_kernels.attention.config import BackwardConfig, ForwardConfig
from pallas_kernels.attention.ops import gathered_offset_attention

__all__ = ["BackwardConfig", "ForwardConfig", "gathered_offset_attention"]
