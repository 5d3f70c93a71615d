"""``train.study.stats``: Student's t without scipy, checked against printed tables and closed
forms, and the paired-comparison arithmetic (interval half-width, detectable difference, seeds
needed for 80% power) against hand-computed values and published power tables."""

import math

import numpy as np
import pytest

from train.study import stats

# t_{0.975, df}: the printed tables' 3 decimals, and 11 digits (df 1 and 2 in closed form below)
T975_PRECISE = {1: 12.7062047362, 2: 4.30265272975, 5: 2.57058183564, 10: 2.22813885196, 30: 2.04227245630}
T975_PRINTED = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 30: 2.042}


def test_t_quantiles_match_the_printed_table():
  for df, t in T975_PRINTED.items():
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    assert stats.t_quantile(0.975, df) == pytest.approx(T975_PRECISE[df], abs=1e-9)
    assert stats.t_quantile(0.025, df) == pytest.approx(-T975_PRECISE[df], abs=1e-9)
  assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
  assert stats.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
  for df, t in enumerate(stats.T975, 1):  # the table the report's intervals use, df = 1..30
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)


def test_normal_quantiles():
  assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.959963984540, abs=1e-11)
  assert stats.t_quantile(0.8, math.inf) == pytest.approx(0.841621233573, abs=1e-11)
  assert stats.t_quantile(0.5, 7) == 0.0


def test_t_cdf_closed_forms():
  for t in (-40.0, -3.0, -0.2, 0.0, 0.7, 5.0, 1e4):
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert stats.t_cdf(t, math.inf) == pytest.approx(0.5 * math.erfc(-t / math.sqrt(2)), abs=1e-15)
    assert stats.t_cdf(t, 7.5) + stats.t_cdf(-t, 7.5) == pytest.approx(1.0, abs=1e-13)
  # df = 1: the quantile is tan(pi (p - 1/2)), far into the tail too
  assert stats.t_quantile(0.999999, 1) == pytest.approx(math.tan(math.pi * 0.499999), rel=1e-10)


def test_quantile_inverts_the_cdf():
  for df in (1, 2.5, 3, 9, 29, 1000, 1e6):
    for p in (1e-6, 0.01, 0.3, 0.6, 0.9, 0.995):
      assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, rel=1e-10)


def test_large_df_approaches_the_normal():
  z = 1.959963984540054
  for df in (1e4, 1e6):  # Cornish-Fisher: z + (z^3 + z) / (4 df) + (5z^5 + 16z^3 + 3z) / (96 df^2)
    expected = z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-9)
  assert stats.t_cdf(2.0, 1e12) == pytest.approx(stats.normal_cdf(2.0), abs=1e-9)


def test_incomplete_beta_closed_forms():
  for x in (0.01, 0.3, 0.77, 0.999):
    assert stats.betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert stats.betainc(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-13)
    assert stats.betainc(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    assert stats.betainc(2.5, 7, x) + stats.betainc(7, 2.5, 1 - x) == pytest.approx(1.0, abs=1e-13)
  assert stats.betainc(2, 3, 0.0) == 0.0 and stats.betainc(2, 3, 1.0) == 1.0


def test_interval_beyond_the_table_uses_the_t_quantile():
  xs = [float(i % 7) for i in range(40)]
  m, lo, _ = stats.interval95(xs)
  assert m - lo == pytest.approx(2.02269092 * stats.std(xs) / math.sqrt(40), rel=1e-7)  # t_{0.975, 39}


def test_paired_halfwidth_by_hand():
  diffs = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, sd sqrt(5/3); t_{0.975, 3} = 3.18244630528
  half = 3.18244630528 * math.sqrt(5 / 3) / 2
  assert stats.paired_halfwidth(diffs) == pytest.approx(half, rel=1e-10)
  assert stats.detectable_difference(diffs) == pytest.approx(half, rel=1e-10)
  m, lo, hi = stats.interval95(diffs)
  assert hi - m == pytest.approx(half, rel=2e-4)  # the printed table (3.182) differs in the 4th digit
  assert stats.paired_halfwidth(diffs, 0.99) > half
  assert stats.paired_halfwidth([0.3]) == math.inf
  assert stats.paired_halfwidth([0.25, 0.25, 0.25]) == 0.0


def test_paired_differences():
  assert stats.paired_differences([3.0, 5.0], [1.0, 4.0]) == [2.0, 1.0]
  assert stats.paired_differences([10.1, 19.8], [10.0, 20.0], relative=True) == pytest.approx([0.01, -0.01])
  with pytest.raises(ValueError, match="equally long"):
    stats.paired_differences([1.0], [1.0, 2.0])
  assert stats.ppl_effect(0.005) == pytest.approx(math.log(1.005))


# Paired t test, two-sided alpha = 0.05, power 0.80: seeds (pairs) for effect size d = effect / sd,
# with the power reached (G*Power 3.1, "Means: difference from constant (matched pairs)"; Cohen
# 1988 agrees on n). n - 1 seeds must fall short of 0.80.
POWER_TABLE = {0.5: (34, 0.8078), 0.8: (15, 0.8213), 1.0: (10, 0.8031), 0.2: (199, 0.8017)}


def test_seeds_needed_matches_the_power_table():
  for d, (n, reached) in POWER_TABLE.items():
    assert stats.seeds_needed(d, 1.0) == n, d
    assert stats.paired_power(n, d, 1.0) == pytest.approx(reached, abs=1e-4)
    assert stats.paired_power(n - 1, d, 1.0) < 0.8
  # only the ratio matters: a 0.5% difference against a 1% spread of paired differences is d = 0.5
  assert stats.seeds_needed(0.005, 0.01) == 34
  assert stats.seeds_needed(-0.005, 0.01) == 34
  assert stats.seeds_needed(1.0, 0.0) == 2


def test_power_of_a_null_effect_is_the_level():
  for n in (2, 3, 6, 40, 1000):
    assert stats.paired_power(n, 0.0, 1.0) == pytest.approx(0.05, abs=1e-9)
    assert stats.paired_power(n, 0.0, 1.0, alpha=0.01) == pytest.approx(0.01, abs=1e-9)


def test_power_against_simulation():
  rng = np.random.default_rng(20250530)
  n, effect, sd, trials = 6, 0.4, 0.5, 200_000
  d = rng.normal(effect, sd, size=(trials, n))
  t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
  rejected = float(np.mean(np.abs(t) > stats.t_quantile(0.975, n - 1)))
  expected = stats.paired_power(n, effect, sd)
  assert abs(rejected - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_power_approaches_the_normal_for_many_seeds():
  n, d = 100_000, 0.01  # delta = 3.1623: power ~ Phi(delta - 1.96) + Phi(-delta - 1.96)
  delta = d * math.sqrt(n)
  expected = stats.normal_cdf(delta - 1.959963984540054) + stats.normal_cdf(-delta - 1.959963984540054)
  assert stats.paired_power(n, d, 1.0) == pytest.approx(expected, abs=1e-5)


def test_detectable_difference_at_a_power():
  rng = np.random.default_rng(7)
  diffs = list(rng.normal(0.002, 0.004, size=6))
  sd = stats.std(diffs)
  mde = stats.detectable_difference(diffs, power=0.8)
  assert stats.paired_power(6, mde, sd) == pytest.approx(0.8, abs=1e-8)
  assert mde > stats.detectable_difference(diffs)  # detecting it 80% of the time takes more than the half-width


def test_paired_summary_is_consistent():
  rng = np.random.default_rng(11)
  a = list(rng.normal(3.0, 0.01, size=6))
  b = [x - 0.004 + e for x, e in zip(a, rng.normal(0.0, 0.003, size=6))]
  diffs = stats.paired_differences(a, b)
  out = stats.paired_summary(diffs, stats.ppl_effect(0.005))
  assert out["n"] == 6 and out["mean"] == pytest.approx(stats.mean(diffs))
  assert out["hi"] - out["mean"] == pytest.approx(out["half"]) == pytest.approx(stats.paired_halfwidth(diffs))
  assert out["seeds"] == stats.seeds_needed(math.log1p(0.005), stats.std(diffs))
  assert out["mde"] > out["half"]
  assert stats.paired_summary([0.1], 0.005)["seeds"] is None


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="zero difference"):
    stats.seeds_needed(0.0, 1.0)
  with pytest.raises(ValueError, match="at least 2 seeds"):
    stats.paired_power(1, 0.5, 1.0)
  with pytest.raises(ValueError, match="0 < p < 1"):
    stats.t_quantile(1.0, 3)
  with pytest.raises(ValueError, match="degrees of freedom"):
    stats.t_cdf(1.0, 0)
