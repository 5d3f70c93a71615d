"""Small statistics for the report: mean, standard deviation and a t interval over seeds."""

from __future__ import annotations

import math
from typing import Sequence

# Two-sided 95% quantiles of Student's t distribution, t_{0.975, df}, df = 1..30.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.960


def mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
  """Sample standard deviation (``n - 1``); 0 for a single value."""
  if len(xs) < 2:
    return 0.0
  m = mean(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def interval95(xs: Sequence[float]) -> tuple[float, float, float]:
  """``(mean, low, high)``: the 95% t interval of the mean; infinite bounds for one value."""
  m = mean(xs)
  if len(xs) < 2:
    return m, -math.inf, math.inf
  t = T975[len(xs) - 2] if len(xs) - 1 <= len(T975) else Z975
  half = t * std(xs) / math.sqrt(len(xs))
  return m, m - half, m + half
