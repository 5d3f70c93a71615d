"""Small statistics for the report: mean, standard deviation and a t interval over seeds, and for
paired comparisons (two variants trained on the same seeds) the interval half-width, the smallest
difference the seeds can detect, and the seeds a test of a given difference needs.

Student's t distribution is computed here (no scipy): its CDF through the regularized incomplete
beta function (a continued fraction), its quantiles by Newton's method on the CDF, and the power
of the paired t test exactly, from the noncentral t distribution (Gauss-Legendre quadrature over
the sample standard deviation), not from the normal approximation.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

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
  t = T975[len(xs) - 2] if len(xs) - 1 <= len(T975) else t_quantile(0.975, len(xs) - 1)
  half = t * std(xs) / math.sqrt(len(xs))
  return m, m - half, m + half


# ----------------------------------------------------------------------------- Student's t distribution


def normal_cdf(x: float) -> float:
  return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _beta_fraction(a: float, b: float, x: float) -> float:
  """The continued fraction of the incomplete beta function (modified Lentz); it converges fast
  for ``x < (a + 1) / (a + b + 2)``."""
  tiny, eps = 1e-300, 1e-15
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 100_000):
    for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step, then odd step
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + num / c
      c = c if abs(c) > tiny else tiny
      h *= c * d
    if abs(c * d - 1.0) < eps:
      return h
  raise ArithmeticError(f"incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def _lgamma_step(a: float, b: float) -> float:
  """``lgamma(a + b) - lgamma(a)``; for large ``a`` from Stirling's series, where the difference of
  two huge values would lose its digits."""
  if a < 1e4:
    return math.lgamma(a + b) - math.lgamma(a)
  c = a + b
  series = (1.0 / c - 1.0 / a) / 12.0 - (1.0 / c ** 3 - 1.0 / a ** 3) / 360.0
  return (a - 0.5) * math.log1p(b / a) + b * math.log(c) - b + series


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
  """The regularized incomplete beta function ``I_x(a, b)``; ``y = 1 - x`` may be given exactly
  when ``x`` is close to 1 (where ``1 - x`` would lose digits)."""
  y = 1.0 - x if y is None else y
  if x <= 0.0:
    return 0.0
  if y <= 0.0:
    return 1.0
  big, small = max(a, b), min(a, b)
  log_x = math.log1p(-y) if y < 0.5 else math.log(x)
  log_y = math.log1p(-x) if x < 0.5 else math.log(y)
  front = math.exp(_lgamma_step(big, small) - math.lgamma(small) + a * log_x + b * log_y)
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _beta_fraction(a, b, x) / a
  return 1.0 - front * _beta_fraction(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
  """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom (``math.inf``: the normal)."""
  if df <= 0:
    raise ValueError(f"degrees of freedom must be > 0, got {df}")
  if df > 1e10:  # closer to the normal than 1e-9 (the difference falls as 1/df)
    return normal_cdf(t)
  if t == 0.0:
    return 0.5
  # P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t^2)
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
  return 1.0 - tail if t > 0 else tail


def t_pdf(t: float, df: float) -> float:
  """The density of Student's t (``math.inf``: the normal)."""
  if math.isinf(df):
    return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
  log_density = _lgamma_step(df / 2.0, 0.5) - 0.5 * math.log(df * math.pi) - (df + 1.0) / 2.0 * math.log1p(t * t / df)
  return math.exp(log_density)


def t_quantile(p: float, df: float) -> float:
  """The ``t`` with ``t_cdf(t, df) == p`` (``df = math.inf``: the normal quantile): Newton's
  method on the CDF inside a bracket that bisection keeps when a Newton step leaves it."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
  if p == 0.5:
    return 0.0
  upper = max(p, 1.0 - p)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < upper:
    lo, hi = hi, 2.0 * hi
  t = 0.5 * (lo + hi)
  for _ in range(200):
    f = t_cdf(t, df) - upper
    if f < 0:
      lo = t
    else:
      hi = t
    step = f / max(t_pdf(t, df), 1e-300)
    new = t - step if lo < t - step < hi else 0.5 * (lo + hi)
    if abs(new - t) <= 1e-14 * new or hi - lo <= 1e-14 * hi:
      t = new
      break
    t = new
  return t if p > 0.5 else -t


# ----------------------------------------------------------------------------- paired comparisons
#
# Variants trained on the same seeds are compared through their per-seed differences
# ``d_i = value(a, seed i) - value(b, seed i)``; the paired t test asks whether their mean is 0.
# For losses in nats, a relative perplexity difference ``r`` is a loss difference ``log1p(r)``
# (``ppl_effect``): 0.5% perplexity is 0.00499 nats.


def ppl_effect(relative: float) -> float:
  """The loss difference (nats) of a relative perplexity difference (0.005: 0.5%)."""
  return math.log1p(relative)


def paired_differences(a: Sequence[float], b: Sequence[float], relative: bool = False) -> list[float]:
  """Per-seed ``a_i - b_i`` (``relative``: ``a_i / b_i - 1``) of two equally long per-seed lists."""
  if len(a) != len(b) or not a:
    raise ValueError(f"paired values need two equally long, non-empty lists, got {len(a)} and {len(b)}")
  return [x / y - 1.0 if relative else x - y for x, y in zip(a, b)]


def paired_halfwidth(diffs: Sequence[float], confidence: float = 0.95) -> float:
  """Half-width of the t interval of the mean paired difference, ``t_{(1+c)/2, n-1} sd / sqrt(n)``;
  infinite for fewer than two seeds."""
  n = len(diffs)
  if n < 2:
    return math.inf
  return t_quantile(0.5 + confidence / 2.0, n - 1) * std(diffs) / math.sqrt(n)


@functools.cache
def _gauss_legendre(points: int = 400) -> tuple[np.ndarray, np.ndarray]:
  """Gauss-Legendre nodes and weights on [-1, 1]: Newton's method on the Legendre polynomial from
  the usual cosine guesses (computed once)."""
  x = np.cos(np.pi * (np.arange(1, points + 1) - 0.25) / (points + 0.5))
  for _ in range(100):
    p0, p1 = np.ones_like(x), x
    for k in range(2, points + 1):
      p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
    dp = points * (x * p1 - p0) / (x * x - 1.0)
    step = p1 / dp
    x = x - step
    if np.max(np.abs(step)) < 1e-15:
      break
  return x, 2.0 / ((1.0 - x * x) * dp * dp)


def paired_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
  """Power of the two-sided paired t test at level ``alpha`` with ``n`` seeds when the paired
  differences have mean ``effect`` and standard deviation ``sd``: ``P(|T'| > t_{1-alpha/2, n-1})``
  for ``T' = (Z + delta) / S``, ``delta = effect sqrt(n) / sd`` (noncentral t), computed exactly
  as ``E_S[Phi(delta - c S) + Phi(-delta - c S)]`` over ``S = sqrt(chi2_{n-1} / (n-1))``."""
  if n < 2:
    raise ValueError(f"a paired t test needs at least 2 seeds, got {n}")
  if sd < 0 or not 0.0 < alpha < 1.0:
    raise ValueError(f"need sd >= 0 and 0 < alpha < 1, got sd={sd}, alpha={alpha}")
  if sd == 0.0:
    return 1.0 if effect != 0.0 else alpha
  df = n - 1
  c = t_quantile(1.0 - alpha / 2.0, df)
  delta = abs(effect) * math.sqrt(n) / sd
  # S has density 2 (df/2)^(df/2) / Gamma(df/2) s^(df-1) exp(-df s^2 / 2): mean near 1, sd near 1/sqrt(2 df)
  width = 12.0 / math.sqrt(2.0 * df)
  lo, hi = max(0.0, 1.0 - width), 1.0 + width + (8.0 if df < 3 else 0.0)
  nodes, weights = _gauss_legendre()
  s = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
  log_density = (math.log(2.0) + 0.5 * df * math.log(0.5 * df) - math.lgamma(0.5 * df) + (df - 1) * np.log(s)
                 - 0.5 * df * s * s)
  tails = np.array([normal_cdf(delta - c * v) + normal_cdf(-delta - c * v) for v in s])
  return float(min(1.0, 0.5 * (hi - lo) * np.sum(weights * np.exp(log_density) * tails)))


def seeds_needed(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05) -> int:
  """The fewest seeds (pairs, at least 2) with which the two-sided paired t test at level ``alpha``
  detects a mean paired difference ``effect`` with probability ``power`` (``paired_power``, exact
  noncentral t), given the standard deviation ``sd`` of the paired differences. The search starts
  next to the normal approximation ``((z_{1-alpha/2} + z_power) sd / effect)^2`` and steps, one
  seed at a time, to the fewest seeds whose exact power reaches ``power`` (power grows with n)."""
  if effect == 0.0:
    raise ValueError("no number of seeds detects a zero difference")
  if not 0.0 < power < 1.0:
    raise ValueError(f"power must lie in (0, 1), got {power}")
  if sd == 0.0:
    return 2
  z = t_quantile(1.0 - alpha / 2.0, math.inf) + t_quantile(power, math.inf)
  n = max(2, math.floor((z * sd / effect) ** 2) - 1)
  while n > 2 and paired_power(n - 1, effect, sd, alpha) >= power:
    n -= 1
  while paired_power(n, effect, sd, alpha) < power:
    n += 1
  return n


def detectable_difference(diffs: Sequence[float], power: float | None = None, alpha: float = 0.05) -> float:
  """The smallest mean paired difference these seeds resolve. Without ``power``: the ``1 - alpha``
  interval half-width (``paired_halfwidth``), the smallest observed mean whose interval excludes
  0. With ``power``: the true difference the two-sided test detects with that probability at
  these seeds and this spread (the minimum detectable effect; larger than the half-width)."""
  if power is None:
    return paired_halfwidth(diffs, 1.0 - alpha)
  n, sd = len(diffs), std(diffs)
  if n < 2:
    return math.inf
  if sd == 0.0:
    return 0.0
  lo, hi = 0.0, sd
  while paired_power(n, hi, sd, alpha) < power:
    lo, hi = hi, 2.0 * hi
  while hi - lo > 1e-10 * hi:
    mid = 0.5 * (lo + hi)
    if paired_power(n, mid, sd, alpha) < power:
      lo = mid
    else:
      hi = mid
  return hi


def paired_summary(diffs: Sequence[float], effect: float, power: float = 0.8, alpha: float = 0.05) -> dict:
  """What the report states for one comparison of per-seed differences ``diffs``: ``n``, ``mean``,
  ``sd``, ``half`` (the ``1 - alpha`` half-width: the smallest detectable difference), ``lo`` and
  ``hi``, ``mde`` (the difference detected with ``power``) and ``seeds`` (the seeds a test of
  ``effect`` at ``power`` would need given ``sd``; ``None`` with fewer than two seeds)."""
  n, m, sd = len(diffs), mean(diffs), std(diffs)
  half = paired_halfwidth(diffs, 1.0 - alpha)
  return {"n": n, "mean": m, "sd": sd, "half": half, "lo": m - half, "hi": m + half,
          "mde": detectable_difference(diffs, power, alpha),
          "seeds": seeds_needed(effect, sd, power, alpha) if n >= 2 else None}
