"""Kernel configurations for the tests: the heuristic's, with the fields a test exercises replaced."""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.attention.config import BackwardConfig, default_backward, default_forward
from pallas_kernels.attention.ops import attention_problem


def kernel_configs(q: jax.Array, k: jax.Array, offsets: jax.Array, *, window: int, reach: int | None = None,
                   backend: str = "gpu", fwd: dict | None = None, bwd: dict | None = None, **both) -> dict:
  """``config`` and ``config_bwd`` for ``gathered_offset_attention(q, k, v, ...)`` (or
  ``fibjax.attention``): the heuristic's configuration of each pass for this call, with the fields
  in ``both`` replaced in every pass that has them (``loop_group`` and ``saved_terms``: the backward
  only), then those in ``fwd`` in the forward and in ``bwd`` in the backward."""
  unknown = set(both) - {f.name for f in dataclasses.fields(BackwardConfig)}
  if unknown:
    raise TypeError(f"no kernel config has the fields {sorted(unknown)}")
  problem = attention_problem(q, k, offsets, window=window, reach=reach, backend=backend)
  out = {}
  for name, config, own in (("config", default_forward(problem), fwd), ("config_bwd", default_backward(problem), bwd)):
    fields = {f.name for f in dataclasses.fields(config)}
    out[name] = dataclasses.replace(config, **{**{k: v for k, v in both.items() if k in fields}, **(own or {})})
  return out
