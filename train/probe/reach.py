"""Where information can travel in principle: relative distances reachable through the layers.

One layer moves information from key ``j`` to query ``i`` when ``i - j`` is in its hop set: the
window ``0..W-1`` plus its offsets (a learned term reads both ``floor`` and ``ceil`` of its
distance); the residual stream lets any layer add a hop of 0. Through ``L`` layers the reachable
distances are the sum of the ``L`` hop sets.
"""

from __future__ import annotations

import numpy as np
from flax import nnx


def hop_sets(model: nnx.Module) -> list[np.ndarray | None]:
  """Per layer of a ``fibjax.LM``: the sorted int distances one layer can hop (``None``: dense)."""
  out: list[np.ndarray | None] = []
  for block in model.blocks:
    attn = block.attn
    p = attn.pattern
    if p.kind == "dense":
      out.append(None)
      continue
    if p.kind == "learned":
      d = np.asarray(attn.offsets(), np.float64)
      d = d[(d >= p.window) & (d < p.reach)]
      offsets = np.concatenate([np.floor(d), np.ceil(d)]).astype(np.int64)
    else:
      offsets = np.asarray(p.offsets, np.int64)
    out.append(np.unique(np.concatenate([np.arange(p.window), offsets])))
  return out


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
