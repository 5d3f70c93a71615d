import pytest

from fibjax import coprime_order, layer_alphas, linear_alphas, schedules, two_hop_coverage


def test_fixed_and_learned_are_constant():
  assert layer_alphas("fixed", 4, base="fib", window=8, reach=128, alpha_0=1.5) == (1.5,) * 4
  assert layer_alphas("learned", 3, base="pow2", window=8, reach=128, alpha_0=0.7) == (0.7,) * 3


def test_linear_values():
  assert linear_alphas(4, 0.5, 2.0) == (0.5, 1.0, 1.5, 2.0)
  assert layer_alphas("linear", 1, base="fib", window=8, reach=128) == (0.5,)


@pytest.mark.parametrize("base", ["fib", "pow2"])
def test_coprime_is_a_deterministic_permutation_of_linear(base):
  lin = layer_alphas("linear", 16, base=base, window=64, reach=1024)
  cop = layer_alphas("coprime", 16, base=base, window=64, reach=1024)
  assert sorted(cop) == sorted(lin) and cop != lin
  schedules._coprime_order.cache_clear()
  assert layer_alphas("coprime", 16, base=base, window=64, reach=1024) == cop


@pytest.mark.parametrize(
    "layers, window, reach, base",
    [(16, 64, 1024, "fib"), (16, 64, 1024, "pow2"), (16, 64, 4096, "fib"), (16, 64, 4096, "pow2"), (8, 32, 512, "fib"), (8, 32, 512, "pow2"),
     (6, 16, 256, "fib")],
)
def test_coprime_leaves_fewer_holes_than_linear(layers, window, reach, base):
  lin = layer_alphas("linear", layers, base=base, window=window, reach=reach)
  cop = layer_alphas("coprime", layers, base=base, window=window, reach=reach)
  union_lin, pairs_lin = two_hop_coverage(lin, base, window, reach)
  union_cop, pairs_cop = two_hop_coverage(cop, base, window, reach)
  # more distinct positions reachable in two hops through consecutive layers: first in the union
  # over all pairs, then (where the union is already full or tied) summed pair by pair
  assert union_cop >= union_lin
  assert (union_cop, pairs_cop) > (union_lin, pairs_lin)


def test_two_hop_coverage_by_hand():
  # window 2, offsets {3}: P = {0, 1, 3}; two hops reach {0,1,2,3,4,6}
  assert two_hop_coverage((1.0, 1.0), "fib", 2, 4) == (4, 4)
  assert two_hop_coverage((1.0, 1.0), "fib", 2, 7)[0] == len({0, 1, 2, 3, 4, 6} | {5, 8} - {8})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(schedule="stagger"), "schedule"),
        (dict(num_layers=0), "num_layers"),
        (dict(alpha_0=0.0), "alpha_0"),
        (dict(schedule="linear", alpha_min=-1.0), "alpha_min"),
        (dict(schedule="linear", alpha_min=2.0, alpha_max=1.0), "alpha_max"),
    ],
)
def test_bad_schedule_inputs(kwargs, field):
  args = dict(schedule="fixed", num_layers=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    layer_alphas(args.pop("schedule"), args.pop("num_layers"), base="fib", window=8, reach=128, **args)
