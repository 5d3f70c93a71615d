"""JAX's persistent compilation cache for the tests' subprocesses (``python -m train``, sweeps,
probes): each starts a fresh JAX, and the tests' tiny runs compile the same programs again and
again (a train step, an evaluation), seconds each on a CPU. A process that finds a program in the
cache loads it instead; what it computes is the same program's result.

One cache folder per test process (a pytest-xdist worker), so no two test processes write an
entry at once, removed when that process exits. Only for subprocesses whose test does not need
compiling to take time (a signal sent while a run compiles, a kill before its last evaluation) and
that run under no file-size limit (``ulimit -f``: a cache write would fail there): those keep the
plain environment."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_folder: str | None = None


def cached_env(base: dict[str, str] | None = None) -> dict[str, str]:
  """``base`` (default ``os.environ``) with the compilation cache of this test process on."""
  global _folder
  if _folder is None:
    _folder = tempfile.mkdtemp(prefix="fibjax-test-jax-cache-")
    atexit.register(shutil.rmtree, _folder, True)
  return {**(os.environ if base is None else base), "JAX_COMPILATION_CACHE_DIR": _folder,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
