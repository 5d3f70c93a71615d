"""XLA flags the trainer sets by default (before the backend starts), unless the user set them."""

from __future__ import annotations

import os

from fibjax.implementation import DETERMINISTIC_FLAG

# Measured on an H100 (benchmarks/results/NOTES.md): the paper recipe's d_model = 512 matmuls run
# faster through cuBLAS than through XLA's Triton GEMM emitter (step 49.1 -> 43.3 ms, dense, T = 1024).
DEFAULTS = {"xla_gpu_enable_triton_gemm": "false"}
# A run with ``deterministic=true``: XLA picks only run-to-run deterministic GPU algorithms (no
# atomics in scatters and reductions, no timing-dependent autotuning choice), so the same seed on
# the same GPU type repeats its loss curve bit for bit. On the kernel path the train step holds no
# scatter (the one op the mode serialises), and dense attention leaves cuDNN for XLA's
# (``fibjax.implementation.resolve_dense``); its cost: python -m benchmarks.determinism (NOTES.md).
DETERMINISTIC = dict([DETERMINISTIC_FLAG.removeprefix("--").split("=")])


def apply_defaults(deterministic: bool = False) -> None:
  """Adds each default flag (and with ``deterministic`` the flags of ``DETERMINISTIC``) to
  ``XLA_FLAGS`` unless that flag is already there. Call it before the first computation: XLA
  reads the flags when the backend starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = {**DEFAULTS, **(DETERMINISTIC if deterministic else {})}
  extra = [f"--{name}={value}" for name, value in wanted.items() if f"--{name}" not in flags]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
