"""Offset sets: which long-range relative distances a layer attends to (SPEC section 1).

For a base sequence ``s`` and a scale ``alpha > 0`` a layer's offset set is

    O(alpha) = sorted unique { round(alpha * s_k) : W <= round(alpha * s_k) < R }

with ``round`` rounding halves up (``floor(x + 0.5)``, never banker's rounding), ``W`` the
dense local window and ``R`` the reach. Distances below ``W`` already lie in the window and
are dropped; distances at or beyond ``R`` are never attended to.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

Base = Literal["fib", "pow2"]
BASES: tuple[str, ...] = ("fib", "pow2")


def check_int(name: str, value: object, low: int) -> int:
  """``value`` as an int if it is one (a Python or NumPy int, not a bool) ``>= low``, else
  ``ValueError`` naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {low}, got {value!r} of type {type(value).__name__}")
  if value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value}")
  return int(value)


def check_window_reach(window: object, reach: object) -> tuple[int, int]:
  """Validates the window ``W >= 1`` and the reach ``R > W``; returns them as ints."""
  w = check_int("window", window, 1)
  r = check_int("reach", reach, 1)
  if r <= w:
    raise ValueError(f"reach must be > window (offsets live in [window, reach)), got reach={r}, window={w}")
  return w, r


def check_alpha(alpha: object, name: str = "alpha") -> float:
  """Validates a scale ``alpha > 0`` (finite real); returns it as float."""
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
    raise ValueError(f"{name} must be a real number > 0, got {alpha!r} of type {type(alpha).__name__}")
  if not math.isfinite(float(alpha)) or float(alpha) <= 0:
    raise ValueError(f"{name} must be a finite real number > 0, got {alpha}")
  return float(alpha)


def check_base(base: object) -> str:
  if base not in BASES:
    raise ValueError(f"base must be one of {BASES}, got {base!r}")
  return str(base)


def base_sequence(base: Base, limit: float) -> tuple[int, ...]:
  """Distinct terms of the base sequence that are < ``limit``, ascending.

  ``fib``: 1, 2, 3, 5, 8, 13, ... (the Fibonacci numbers without the repeated 1).
  ``pow2``: 1, 2, 4, 8, 16, ...
  """
  check_base(base)
  if not math.isfinite(limit):
    raise ValueError(f"limit must be a finite number, got {limit!r}")
  out: list[int] = []
  a, b = 1, 2
  while a < limit:
    out.append(a)
    a, b = (b, a + b) if base == "fib" else (2 * a, None)
  return tuple(out)


def round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def offset_set(base: Base, alpha: float, window: int, reach: int) -> tuple[int, ...]:
  """``O(alpha)`` of SPEC section 1: sorted, unique integer offsets in ``[window, reach)``.

  Args:
    base: ``"fib"`` or ``"pow2"``.
    alpha: scale > 0.
    window: dense local window ``W >= 1`` (distances ``0..W-1`` are always attended).
    reach: ``R > W``; no offset reaches ``R`` or beyond.
  Returns:
    A tuple of ints, possibly empty.
  """
  check_base(base)
  alpha = check_alpha(alpha)
  window, reach = check_window_reach(window, reach)
  terms = base_sequence(base, reach / alpha + 1)
  return tuple(sorted({d for s in terms if window <= (d := round_half_up(alpha * s)) < reach}))


def reach_matched_pow2(alpha: float, window: int, reach: int) -> tuple[int, ...]:
  """The power-of-2 control for the Fibonacci set ``offset_set("fib", alpha, window, reach)``.

  Same ``alpha`` and window, reach cut to the Fibonacci set's largest offset (inclusive), so
  the control never looks further back than the set it stands in for. An empty Fibonacci set
  gives an empty control.
  """
  fib = offset_set("fib", alpha, window, reach)
  if not fib:
    return ()
  return offset_set("pow2", alpha, window, fib[-1] + 1)


def learned_terms(base: Base, alpha_0: float, window: int, reach: int) -> tuple[int, ...]:
  """Base terms ``s_k`` a learned-alpha layer keeps: those with ``W <= alpha_0 * s_k < R``.

  The count K is fixed here, at initialisation; training moves ``alpha`` and so the distances
  ``alpha * s_k``, and a term whose distance leaves ``[W, R)`` is masked, not dropped.
  """
  check_base(base)
  alpha_0 = check_alpha(alpha_0, "alpha_0")
  window, reach = check_window_reach(window, reach)
  return tuple(s for s in base_sequence(base, reach / alpha_0 + 1) if window <= alpha_0 * s < reach)


def layer_offsets(base: Base, alpha: float, window: int, reach: int) -> tuple[int, ...]:
  """A layer's static offsets: the Fibonacci set, or for ``pow2`` its reach-matched control."""
  if check_base(base) == "fib":
    return offset_set("fib", alpha, window, reach)
  return reach_matched_pow2(alpha, window, reach)


def random_offsets(base: Base, alphas: Sequence[float], window: int, reach: int, seed: int
                   ) -> tuple[tuple[int, ...], ...]:
  """The ``random`` control: per layer as many offsets as ``layer_offsets(base, alpha_l, W, R)``
  holds, at distances drawn uniformly without replacement from ``[W, R)``.

  One ``numpy.random.default_rng(seed)`` draws the layers in order, so the result is a pure
  function of the arguments for a given NumPy; runs store it (``ModelConfig.random_offsets``)
  because NumPy does not promise the same stream across versions.

  Args:
    base: ``"fib"`` or ``"pow2"``; with ``alphas`` it fixes only each layer's count.
    alphas: ``[L]`` per-layer scales, usually the ``linear`` schedule's.
    window, reach: ``W >= 1`` and ``R > W``.
    seed: an int >= 0.
  Returns:
    ``L`` tuples of sorted, unique ints in ``[W, R)``.
  """
  window, reach = check_window_reach(window, reach)
  seed = check_int("seed", seed, 0)
  if not isinstance(alphas, (tuple, list, np.ndarray)):
    raise ValueError(f"alphas must be a sequence of per-layer alphas, e.g. linear_alphas(L, 0.5, 2.0), got {alphas!r}")
  rng = np.random.default_rng(seed)
  out = []
  for alpha in alphas:
    count = len(layer_offsets(base, alpha, window, reach))
    out.append(tuple(sorted(int(o) for o in rng.choice(np.arange(window, reach), size=count, replace=False))))
  return tuple(out)


def check_offset_rows(rows: object, num_layers: int, window: int, reach: int, name: str = "random_offsets"
                      ) -> tuple[tuple[int, ...], ...]:
  """Validates saved per-layer offsets: ``num_layers`` rows, each strictly increasing ints in
  ``[W, R)``; returns them as tuples. Raises ``ValueError`` naming ``name`` and the fix."""
  fix = f"drop {name} (null) to draw them again from the seed"
  if not isinstance(rows, tuple) or len(rows) != num_layers:
    raise ValueError(f"{name} must hold one row of offsets per layer ({num_layers} rows), got {rows!r}; {fix}")
  for layer, row in enumerate(rows):
    ok = isinstance(row, tuple) and all(isinstance(o, (int, np.integer)) and not isinstance(o, bool) for o in row)
    if not ok or any(not window <= o < reach for o in row) or any(a >= b for a, b in zip(row[:-1], row[1:])):
      raise ValueError(f"{name}[{layer}] must be sorted unique ints in [window, reach) = [{window}, {reach}), "
                       f"got {row!r}; {fix}")
  return tuple(tuple(int(o) for o in row) for row in rows)
