import importlib.util
import os
import pathlib

import pytest

from tests.compile_cache import UNOPTIMIZED

# Simulated CPU devices for the sharding tests; harmless for the rest (must precede jax import).
# Where no accelerator plugin is installed (the CPU suite), XLA's CPU backend also compiles at
# optimisation level 0: the tests' programs run on a few hundred tokens, so LLVM optimising them
# costs more time than it saves (the suite, kernels in interpret mode above all, spends most of its
# time compiling). Subprocesses inherit the flags (tests.compile_cache.optimized_env drops it).
_ACCELERATOR = any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))
_FLAGS = ["--xla_force_host_platform_device_count=8", *([] if _ACCELERATOR else [UNOPTIMIZED])]
os.environ.setdefault("XLA_FLAGS", " ".join(_FLAGS))
# Several pytest-xdist workers share one GPU: each allocates as it goes instead of taking 75% of the
# memory up front, which would leave the others none.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


# Trained runs that several test modules read or copy (none writes into them): one per test session
# (per pytest-xdist worker) instead of one per module. The test modules are imported inside the
# fixtures, after XLA_FLAGS is set above.


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> pathlib.Path:
  """A finished 8-step tiny run (``tests.test_reliability.BASE``) with checkpoints 4 and 8."""
  from tests.test_reliability import BASE, _steps  # noqa: PLC0415
  from tests.test_train import _run  # noqa: PLC0415

  workdir = tmp_path_factory.mktemp("base") / "run"
  res = _run(workdir, *BASE)
  assert res.returncode == 0, res.stderr[-3000:]
  assert _steps(workdir) == [4, 8]
  return workdir


@pytest.fixture(scope="session")
def cell(tmp_path_factory) -> pathlib.Path:
  """A finished fib-linear seed-0 sweep cell (``tests.test_sweep_report_errors.CELL``: 4 steps,
  budget ``full`` only)."""
  from tests.test_experiments import _module  # noqa: PLC0415
  from tests.test_sweep_report_errors import CELL  # noqa: PLC0415

  workdir = tmp_path_factory.mktemp("cell") / "fib-linear-s0"
  res = _module("train.study.experiment", "--workdir", str(workdir), *CELL, "progress=false", timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir
