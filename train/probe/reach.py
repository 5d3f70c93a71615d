"""Where information can travel in principle: relative distances reachable through the layers.

One layer moves information from key ``j`` to query ``i`` when ``i - j`` is in its hop set: the
window ``0..W-1`` plus its offsets (a learned term reads both ``floor`` and ``ceil`` of its
distance); the residual stream lets any layer add a hop of 0. Through ``L`` layers the reachable
distances are the sum of the ``L`` hop sets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from fibjax.layers import LayerPattern
from fibjax.model import ModelConfig, layer_patterns


def with_window(window: int, offsets: np.ndarray) -> np.ndarray:
  """The sorted unique int distances ``0..window-1`` and ``offsets``."""
  return np.unique(np.concatenate([np.arange(window), np.asarray(offsets, np.int64)]))


def pattern_hops(p: LayerPattern) -> np.ndarray | None:
  """The distances one layer of a fixed pattern can hop (``None``: dense; a dense sliding window of
  ``sink_window`` keys hops up to ``sink_window - 1``, its sink tokens aside). A learned pattern's
  distances are trained parameters: ``hop_sets`` reads them from the model."""
  if p.kind == "dense":
    return None if p.sink_window is None else np.arange(p.sink_window)
  if p.kind == "learned":
    raise ValueError("a learned pattern's offsets are trained parameters: read them with hop_sets(model)")
  return with_window(p.window, p.offsets)


def hop_sets(model: nnx.Module) -> list[np.ndarray | None]:
  """Per layer of a ``fibjax.LM``: the sorted int distances one layer can hop (``None``: dense)."""
  out: list[np.ndarray | None] = []
  for block in model.blocks:
    p = block.attn.pattern
    if p.kind != "learned":
      out.append(pattern_hops(p))
      continue
    d = np.asarray(block.attn.offsets(), np.float64)
    d = d[(d >= p.window) & (d < p.reach)]
    out.append(with_window(p.window, np.concatenate([np.floor(d), np.ceil(d)]).astype(np.int64)))
  return out


def config_hop_sets(model: dict[str, Any], sink_window: bool = False) -> list[np.ndarray | None] | None:
  """Per layer of the model a ``config.json``'s ``model`` dict builds (``fibjax.model.layer_patterns``,
  no parameters made): the distances one layer can hop; ``None`` for a learned pattern (its offsets
  are trained). ``sink_window``: the dense model evaluated with a sliding window of T keys plus sink
  tokens (``train.run.evaluation.sink_window_graph``)."""
  cfg = ModelConfig(**model)
  if sink_window:
    cfg = dataclasses.replace(cfg, eval_window=cfg.seq_len)
  patterns = layer_patterns(cfg)
  if any(p.kind == "learned" for p in patterns):
    return None
  return [pattern_hops(p) for p in patterns]


def reachable(hops: list[np.ndarray | None], max_distance: int) -> np.ndarray:
  """``[max_distance + 1]`` bool: distance ``d`` reachable through the layers in order."""
  ok = np.zeros(max_distance + 1, bool)
  ok[0] = True
  for h in hops:
    if h is None:
      return np.ones(max_distance + 1, bool)
    nxt = ok.copy()
    for d in h[(h > 0) & (h <= max_distance)]:
      nxt[d:] |= ok[: max_distance + 1 - d]
    ok = nxt
  return ok
