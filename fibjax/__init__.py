"""fibjax: Fibonacci-offset sparse attention in JAX (offsets, schedules, attention, NNX models)."""

from fibjax.attention import attention, dense_attention
from fibjax.generate import generate, stream
from fibjax.layers import Attention, Block, LayerPattern, MLP, rope
from fibjax.model import (CONTROL_VARIANTS, LM, SWEEP_VARIANTS, VARIANTS, ModelConfig, abstract_param_count,
                          count_params, layer_patterns)
from fibjax.offsets import base_sequence, layer_offsets, learned_terms, offset_set, random_offsets, reach_matched_pow2
from fibjax.schedules import SCHEDULES, coprime_order, layer_alphas, linear_alphas, two_hop_coverage

__all__ = [
    "LM", "ModelConfig", "VARIANTS", "SWEEP_VARIANTS", "CONTROL_VARIANTS", "LayerPattern", "Attention", "Block",
    "MLP", "rope", "attention", "dense_attention", "offset_set", "reach_matched_pow2", "layer_offsets",
    "learned_terms", "random_offsets", "base_sequence", "layer_alphas", "linear_alphas", "coprime_order",
    "two_hop_coverage", "SCHEDULES", "layer_patterns", "count_params", "abstract_param_count", "generate", "stream",
]
__version__ = "0.1.0"
