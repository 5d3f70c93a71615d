"""Gathered-offset attention in Pallas: GPU (Triton lowering; a Mosaic GPU forward and dQ pass by config) and
TPU (Mosaic), fwd + bwd."""

from pallas_kernels.attention.config import BackwardConfig, ForwardConfig, MosaicBackwardConfig, MosaicForwardConfig
from pallas_kernels.attention.ops import gathered_offset_attention

__all__ = ["BackwardConfig", "ForwardConfig", "MosaicBackwardConfig", "MosaicForwardConfig",
           "gathered_offset_attention"]
