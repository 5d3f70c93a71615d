"""``pallas_kernels.relaxed_atomics``: marked kernels' atomic adds are lowered relaxed, others keep
Pallas' acquire-release ordering. Checked in the Triton IR that lowering for CUDA emits (on CPU:
lowering needs no GPU), and on the fused decode kernels themselves; installed only when those
kernels are built, and only on the tested JAX versions."""

import os
import pathlib
import subprocess
import sys
import tomllib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import relaxed_atomics
from pallas_kernels.decode.attention import sparse_attention
from pallas_kernels.decode.projections import project


def _atomic_orderings(fn, *args) -> list[str]:
  """The ordering of every ``tt.atomic_rmw`` in the Triton kernels of ``jit(fn)`` lowered for CUDA."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.triton import dialect as tt  # noqa: PLC0415

  module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir()
  kernels = []

  def walk(op):
    for region in op.regions:
      for block in region:
        for inner in block:
          if inner.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
            config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
            if "ir" in config:
              kernels.append(ir.StringAttr(config["ir"]).value_bytes)
          walk(inner)

  walk(module.operation)
  assert kernels, "no Triton kernel in the lowered module"
  found = []
  with ir.Context() as ctx:
    tt.register_dialect(ctx)
    for data in kernels:
      text = str(ir.Module.parse(data))
      found += [line.split("tt.atomic_rmw")[1].split(",")[1].strip() for line in text.splitlines()
                if "tt.atomic_rmw" in line]
  return found


def _adder(name):
  def kernel(x_ref, o_in, o_ref):
    plgpu.atomic_add(o_ref, pl.ds(0, 16), x_ref[...], mask=x_ref[...] > 0)

  return lambda x, o: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                                     input_output_aliases={1: 0}, name=name,
                                     compiler_params=plgpu.CompilerParams(num_warps=4))(x, o)


def test_only_marked_kernels_get_relaxed_adds():
  assert relaxed_atomics.install() and relaxed_atomics.installed()
  x = jnp.ones((16,), jnp.float32)
  assert _atomic_orderings(_adder(relaxed_atomics.mark("sum")), x, x) == ["relaxed"]
  assert _atomic_orderings(_adder("sum"), x, x) == ["acq_rel"]  # an unmarked kernel keeps Pallas' ordering
  assert relaxed_atomics.install()  # idempotent: the rule is wrapped once
  assert _atomic_orderings(_adder("sum"), x, x) == ["acq_rel"]


@pytest.mark.parametrize("part", ["mlp", "attention"])
def test_fused_decode_kernels_add_relaxed(part):
  rng = np.random.default_rng(0)
  r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
  x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
  if part == "mlp":
    args = (x, r(64, 64), r(32, 64), x)
    fn = lambda x, w, down, into: project(x, w, norm_scale=jnp.ones(64), swiglu=True,  # noqa: E731
                                         down=down, into=into)
  else:
    cache = {"k": r(1, 9, 2, 32), "v": r(1, 9, 2, 32)}
    fn = lambda qkv, wo, a, b: sparse_attention(  # noqa: E731
        qkv, cache, np.asarray([5, 8], np.int32), jnp.int32(3), window=4, scale=0.1, out_weight=wo,
        residuals=(a, b), out_splits=2)[0]
    args = (r(1, 3, 2, 32), r(64, 64), x, x)
  orderings = _atomic_orderings(fn, *args)
  assert orderings and set(orderings) == {"relaxed"}


def _mlp_kernel_orderings():
  x = jnp.ones((1, 64), jnp.float32)
  w, down = jnp.ones((64, 64), jnp.bfloat16), jnp.ones((32, 64), jnp.bfloat16)
  fn = lambda x, w, down, into: project(x, w, swiglu=True, down=down, into=into)  # noqa: E731
  return _atomic_orderings(fn, x, w, down, x)


def test_importing_the_kernels_installs_nothing():
  code = ("import fibjax, pallas_kernels.decode.block, pallas_kernels.decode.projections, "
          "pallas_kernels.decode.attention; from pallas_kernels import relaxed_atomics; "
          "assert not relaxed_atomics.installed(), 'installed on import'")
  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]


def test_untested_jax_keeps_pallas_ordering_with_one_warning(monkeypatch):
  rules, primitives = relaxed_atomics._lowering()
  rule = rules[primitives.atomic_rmw_p]
  monkeypatch.setitem(rules, primitives.atomic_rmw_p, getattr(rule, "wrapped", rule))  # as before any install
  monkeypatch.setattr(relaxed_atomics, "_warned", False)
  monkeypatch.setattr(jax, "__version_info__", (0, 12, 0))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not relaxed_atomics.install()
    orderings = _mlp_kernel_orderings()  # builds the kernel: install() runs again, warns no more
  assert orderings and set(orderings) == {"acq_rel"}
  assert not relaxed_atomics.installed()
  messages = [str(w.message) for w in caught if "relaxed atomics" in str(w.message)]
  assert len(messages) == 1 and "acquire-release" in messages[0], messages


@pytest.mark.parametrize("version", [(0, 10, 0), (0, 11, 2)])
def test_tested_jax_installs_when_the_kernels_are_built(monkeypatch, version):
  rules, primitives = relaxed_atomics._lowering()
  rule = rules[primitives.atomic_rmw_p]
  monkeypatch.setitem(rules, primitives.atomic_rmw_p, getattr(rule, "wrapped", rule))
  monkeypatch.setattr(jax, "__version_info__", version)
  assert not relaxed_atomics.installed()
  orderings = _mlp_kernel_orderings()
  assert relaxed_atomics.installed() and orderings and set(orderings) == {"relaxed"}


def test_pyproject_allows_exactly_the_tested_jax_versions():
  from packaging.requirements import Requirement  # noqa: PLC0415

  pyproject = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
  spec = next(r.specifier for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "jax")
  tested = {f"{major}.{minor}.{patch}" for major, minor in relaxed_atomics.TESTED_JAX for patch in (0, 9)}
  assert all(v in spec for v in tested), spec
  (lo_major, lo_minor), (hi_major, hi_minor) = relaxed_atomics.TESTED_JAX[0], relaxed_atomics.TESTED_JAX[-1]
  untested = {f"{lo_major}.{lo_minor - 1}.99", f"{hi_major}.{hi_minor + 1}.0"}
  assert not any(v in spec for v in untested), spec
