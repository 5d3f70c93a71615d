import pytest

from fibjax import base_sequence, layer_offsets, learned_terms, offset_set, reach_matched_pow2


def test_fibonacci_set_alpha_one():
  assert offset_set("fib", 1.0, 64, 4096) == (89, 144, 233, 377, 610, 987, 1597, 2584)


def test_sequences():
  assert base_sequence("fib", 60) == (1, 2, 3, 5, 8, 13, 21, 34, 55)
  assert base_sequence("pow2", 70) == (1, 2, 4, 8, 16, 32, 64)


def test_scaling_rounds_half_up_and_dedupes():
  # 0.5 * fib: 0.5, 1, 1.5, 2.5, 4, 6.5, 10.5, 17, 27.5, 44.5, 72, 116.5 -> halves round up
  assert offset_set("fib", 0.5, 4, 120) == (4, 7, 11, 17, 28, 45, 72, 117)
  # a small alpha maps many terms onto the same integer: each counted once
  small = offset_set("fib", 0.3, 1, 100)
  assert len(small) == len(set(small)) and list(small) == sorted(small)


def test_window_and_reach_bound_the_set():
  for alpha in (0.37, 1.0, 1.9, 3.3):
    s = offset_set("fib", alpha, 10, 300)
    assert all(10 <= o < 300 for o in s)
  assert offset_set("fib", 1.0, 64, 80) == ()  # nothing in [64, 80)


def test_reach_matched_pow2_never_exceeds_fib():
  for alpha in (0.5, 1.0, 1.3, 2.0):
    fib = offset_set("fib", alpha, 16, 2048)
    pow2 = reach_matched_pow2(alpha, 16, 2048)
    assert pow2 and max(pow2) <= max(fib)
    assert pow2 == offset_set("pow2", alpha, 16, max(fib) + 1)
  assert reach_matched_pow2(1.0, 64, 80) == ()
  assert layer_offsets("pow2", 1.0, 64, 4096) == (64, 128, 256, 512, 1024, 2048)


def test_learned_terms():
  assert learned_terms("fib", 1.0, 64, 1024) == (89, 144, 233, 377, 610, 987)
  assert learned_terms("fib", 2.0, 64, 1024) == (34, 55, 89, 144, 233, 377)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(base="fib", alpha=1.0, window=0, reach=10), "window"),
        (dict(base="fib", alpha=1.0, window=-3, reach=10), "window"),
        (dict(base="fib", alpha=0.0, window=2, reach=10), "alpha"),
        (dict(base="fib", alpha=-1.0, window=2, reach=10), "alpha"),
        (dict(base="fib", alpha=float("nan"), window=2, reach=10), "alpha"),
        (dict(base="fib", alpha=1.0, window=8, reach=8), "reach"),
        (dict(base="fib", alpha=1.0, window=8, reach=3), "reach"),
        (dict(base="fib", alpha=1.0, window=2.5, reach=10), "window"),
        (dict(base="fib", alpha=1.0, window=True, reach=10), "window"),
        (dict(base="fib", alpha="1", window=2, reach=10), "alpha"),
        (dict(base="fib", alpha=1.0, window=2, reach="10"), "reach"),
        (dict(base="golden", alpha=1.0, window=2, reach=10), "base"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    offset_set(**kwargs)
