"""Alpha across depth: the four schedules of SPEC section 1, and the two-hop hole count."""

from __future__ import annotations

import functools
from typing import Literal, Sequence

import numpy as np

from fibjax.offsets import Base, check_alpha, check_base, check_int, check_window_reach, layer_offsets

Schedule = Literal["fixed", "learned", "linear", "coprime"]
SCHEDULES: tuple[str, ...] = ("fixed", "learned", "linear", "coprime")


def linear_alphas(num_layers: int, alpha_min: float, alpha_max: float) -> tuple[float, ...]:
  """``alpha_l = alpha_min + (alpha_max - alpha_min) * l / (L - 1)``; one layer gets alpha_min.

  Raises:
    ValueError: ``num_layers`` not an int >= 1, an alpha not a finite number > 0, or
      ``alpha_max < alpha_min``.
  """
  num_layers = check_int("num_layers", num_layers, 1)
  alpha_min, alpha_max = check_alpha(alpha_min, "alpha_min"), check_alpha(alpha_max, "alpha_max")
  if alpha_max < alpha_min:
    raise ValueError(f"alpha_max must be >= alpha_min, got alpha_min={alpha_min}, alpha_max={alpha_max}")
  if num_layers == 1:
    return (alpha_min,)
  return tuple(alpha_min + (alpha_max - alpha_min) * l / (num_layers - 1) for l in range(num_layers))


def _pair_cover(p: tuple[int, ...], q: tuple[int, ...], reach: int) -> np.ndarray:
  sums = (np.asarray(p)[:, None] + np.asarray(q)[None, :]).ravel()
  cover = np.zeros(reach, dtype=bool)
  cover[sums[sums < reach]] = True
  return cover


def two_hop_coverage(alphas: tuple[float, ...], base: Base, window: int, reach: int) -> tuple[int, int]:
  """How many relative positions below ``reach`` two hops through consecutive layers reach.

  One hop through layer ``l`` moves back by a distance in ``P_l = {0..W-1} | O_l``; two hops
  through layers ``l, l+1`` reach ``P_l + P_{l+1}``. Returns ``(union, per_pair)``: the number
  of distinct positions in the union over all consecutive pairs, and the sum over pairs of each
  pair's distinct positions. Positions in ``[0, R)`` that neither counts are the "holes".
  """
  hops = [tuple(range(window)) + layer_offsets(base, a, window, reach) for a in alphas]
  covers = [_pair_cover(p, q, reach) for p, q in zip(hops[:-1], hops[1:])]
  if not covers:
    return 0, 0
  return int(np.logical_or.reduce(covers).sum()), int(sum(c.sum() for c in covers))


def coprime_order(alphas: Sequence[float], base: Base, window: int, reach: int) -> tuple[int, ...]:
  """The ``coprime`` (anti-gridding) reassignment of the ``linear`` alphas to layers.

  Rule (deterministic): start from the linear order ``0..L-1``. Repeatedly scan the layer pairs
  ``(i, j)``, ``i < j``, in lexicographic order and apply the first swap of their alphas that
  strictly increases ``two_hop_coverage`` compared as the tuple ``(union, per_pair)``; stop
  when no swap does. Consecutive layers whose offset sets coincide or share a common grid
  (a ratio of alphas near a power of the base's growth factor, or near 1) reach few new
  positions in two hops, so the climb moves them apart: the measurable form of the hybrid
  dilated convolution rule that consecutive dilations share no common factor. The result never
  leaves more holes than the linear order, and is cached per argument tuple.

  Returns:
    ``order`` such that layer ``l`` gets ``alphas[order[l]]``.
  """
  window, reach = check_window_reach(window, reach)
  return _coprime_order(tuple(check_alpha(a) for a in alphas), check_base(base), window, reach)


@functools.lru_cache(maxsize=64)
def _coprime_order(alphas: tuple[float, ...], base: Base, window: int, reach: int) -> tuple[int, ...]:
  n = len(alphas)
  hops = [tuple(range(window)) + layer_offsets(base, a, window, reach) for a in alphas]
  cover = {(a, b): _pair_cover(hops[a], hops[b], reach) for a in range(n) for b in range(n) if a != b}

  def score(order: list[int]) -> tuple[int, int]:
    pairs = [cover[a, b] for a, b in zip(order[:-1], order[1:])]
    return int(np.logical_or.reduce(pairs).sum()), int(sum(c.sum() for c in pairs))

  order = list(range(n))
  best = score(order) if n > 1 else (0, 0)
  improved = n > 2
  while improved:
    improved = False
    for i in range(n):
      for j in range(i + 1, n):
        order[i], order[j] = order[j], order[i]
        s = score(order)
        if s > best:
          best, improved = s, True
        else:
          order[i], order[j] = order[j], order[i]
  return tuple(order)


def layer_alphas(
    schedule: Schedule,
    num_layers: int,
    *,
    base: Base,
    window: int,
    reach: int,
    alpha_0: float = 1.0,
    alpha_min: float = 0.5,
    alpha_max: float = 2.0,
) -> tuple[float, ...]:
  """Per-layer alpha for a schedule (``learned``: the initial values, all ``alpha_0``).

  Raises:
    ValueError: unknown schedule or base, ``num_layers < 1``, a window or reach out of range
      (``W >= 1``, ``R > W``), non-positive alphas, or ``alpha_max < alpha_min``.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  num_layers = check_int("num_layers", num_layers, 1)
  check_base(base)
  check_window_reach(window, reach)
  alpha_0 = check_alpha(alpha_0, "alpha_0")
  if schedule in ("fixed", "learned"):
    return (alpha_0,) * num_layers
  lin = linear_alphas(num_layers, alpha_min, alpha_max)
  if schedule == "linear":
    return lin
  return tuple(lin[i] for i in coprime_order(lin, base, window, reach))
