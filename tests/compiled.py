"""Checks of the compiled (Triton) kernels on a GPU against the XLA path, shared by the GPU tests."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def assert_pallas_matches_xla(attend: Callable, q, k, v, w, seed: int, bound: float = 1.5e-2) -> None:
  """``attend(q, k, v, implementation=...)`` with the Pallas kernels (inputs as given) and on the
  XLA path (inputs cast to float32): output and q, k, v gradients of ``sum(out * w)`` agree to
  ``bound`` relative (Frobenius) error and are finite."""

  def loss(impl, q, k, v):
    cast = (lambda x: x) if impl == "pallas" else (lambda x: x.astype(jnp.float32))
    out = attend(cast(q), cast(k), cast(v), implementation=impl)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

  results = {impl: jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2), has_aux=True))(
      q, k, v) for impl in ("pallas", "xla")}
  (_, out), grads = results["pallas"]
  (_, ref), ref_grads = results["xla"]
  for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), f"{name} seed={seed}"
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < bound, f"{name}: relative error {rel:.2e} (seed={seed})"
