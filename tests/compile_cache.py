"""Compiling less in the tests, whose tiny programs take longer to compile than to run.

``UNOPTIMIZED``: on a CPU (no accelerator plugin installed) ``tests/conftest.py`` has XLA compile
at optimisation level 0 in the test processes and every subprocess (they inherit ``XLA_FLAGS``):
LLVM optimising the tests' programs costs more than it saves. ``optimized_env``: the usual level,
for a subprocess that computes more than it compiles (a probe over hundreds of sequences).

``cached_env``: JAX's persistent compilation cache for the tests' subprocesses (``python -m train``,
sweeps, probes): each starts a fresh JAX, and the tests' tiny runs compile the same programs again
and again (a train step, an evaluation), seconds each on a CPU. A process that finds a program in
the cache loads it instead; what it computes is the same program's result.

One cache folder per test process (a pytest-xdist worker), so no two test processes write an
entry at once, removed when that process exits; or a folder of a test's own. Only for subprocesses
whose test does not need compiling to take time (a signal sent while a run compiles, a kill before
its last evaluation) and that run under no file-size limit (``ulimit -f``: a cache write would fail
there): those keep the plain environment, or a cache folder of their own that starts empty.

``host_devices_env``: fewer simulated CPU devices for a subprocess (``tests/conftest.py`` gives every
process 8, for the sharding tests). A probe that replicates its inputs over the mesh (recall,
perplexity) computes the same batch on each device: 8 of them on a 2-core machine compute it 8 times.
2 devices still make a mesh of several devices."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

UNOPTIMIZED = "--xla_backend_optimization_level=0"
DEVICE_COUNT = "--xla_force_host_platform_device_count"
_folder: str | None = None


def optimized_env(base: dict[str, str] | None = None) -> dict[str, str]:
  """``base`` (default ``os.environ``) with XLA's usual optimisation level (``UNOPTIMIZED`` dropped)."""
  env = dict(os.environ if base is None else base)
  env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split() if flag != UNOPTIMIZED)
  return env


def cached_env(base: dict[str, str] | None = None, folder: os.PathLike | None = None) -> dict[str, str]:
  """``base`` (default ``os.environ``) with the compilation cache on: in ``folder``, by default the
  one of this test process."""
  global _folder
  if folder is None:
    if _folder is None:
      _folder = tempfile.mkdtemp(prefix="fibjax-test-jax-cache-")
      atexit.register(shutil.rmtree, _folder, True)
    folder = _folder
  return {**(os.environ if base is None else base), "JAX_COMPILATION_CACHE_DIR": str(folder),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def host_devices_env(base: dict[str, str] | None = None, count: int = 2) -> dict[str, str]:
  """``base`` (default ``os.environ``) with ``count`` simulated CPU devices in place of conftest's 8."""
  env = dict(os.environ if base is None else base)
  flags = [flag for flag in env.get("XLA_FLAGS", "").split() if not flag.startswith(DEVICE_COUNT + "=")]
  env["XLA_FLAGS"] = " ".join([f"{DEVICE_COUNT}={count}", *flags])
  return env
