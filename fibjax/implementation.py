"""Which implementation computes each op: the names it takes, the one validator, the ``"auto"`` rules.

Every op takes its implementation by name from one vocabulary: ``"xla"`` is the pure jnp
computation XLA compiles (the float reference), ``"pallas"`` the project's Pallas kernels,
``"cudnn"`` cuDNN's fused attention through ``jax.nn.dot_product_attention``, and ``"auto"``
picks one by the op's rule, stated once in the op's ``resolve_*`` function below. Interpret mode
(``interpret=True``: the Pallas kernels run on the CPU, for tests) is a flag, not a name.

The ops (``kind``): ``sparse`` attention (the gathered-offset pattern), ``dense`` attention,
``decode`` (one token through a block, ``Block.decode``) and ``norm`` (the blocks' RMSNorm).
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.attention.config import GPU_KERNELS

Implementation = Literal["auto", "xla", "pallas", "cudnn"]

IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "sparse": ("auto", "xla", "pallas"),
    "dense": ("auto", "xla", "cudnn"),  # there is no dense Pallas kernel
    "decode": ("auto", "xla", "pallas"),
    "norm": ("auto", "xla", "pallas"),
}


def valid_implementations(kind: str) -> tuple[str, ...]:
  """The names the op ``kind`` (a key of ``IMPLEMENTATIONS``) takes."""
  if kind not in IMPLEMENTATIONS:
    raise ValueError(f"kind must be one of {tuple(IMPLEMENTATIONS)}, got {kind!r}")
  return IMPLEMENTATIONS[kind]


def check_implementation(kind: str, impl: str, name: str = "implementation", where: str = "",
                         grouped: bool = False) -> str:
  """``impl`` if the op ``kind`` can run it, else ``ValueError`` naming ``name`` (the argument or
  config field that gave it, ``where`` it was given) and the names the op takes. ``grouped``: the
  model has grouped-query attention, which the fused ``pallas`` decode kernels lack (they read one
  kv head per query head)."""
  valid = valid_implementations(kind)
  if impl not in valid:
    raise ValueError(f"{name} must be one of {valid}{where}, got {impl!r}")
  if kind == "decode" and grouped and impl == "pallas":
    raise ValueError(f"{name}='pallas' has no grouped-query attention{where} (the fused decode kernels read one kv "
                     f"head per query head); use {name}='auto' or 'xla'")
  return impl


def check_kernels(kernels: str | None, impl: str, kind: str, name: str = "kernels") -> str | None:
  """``kernels`` (``None``: the default family, or one of ``GPU_KERNELS``) if a ``kind`` attention layer
  (a ``LayerPattern.kind``) of implementation ``impl`` can take it: a family names Pallas kernels
  of sparse attention, so it needs ``impl == "pallas"`` and a sparse layer. Else ``ValueError``
  naming ``name``."""
  if kernels is None:
    return None
  if kernels not in GPU_KERNELS:
    raise ValueError(f"{name} must be None (the default) or one of {GPU_KERNELS}, got {kernels!r}")
  if kind == "dense" or impl != "pallas":
    raise ValueError(f"{name}={kernels!r} picks the Pallas kernels of sparse attention, not a "
                     f"{'dense layer' if kind == 'dense' else f'{impl!r} implementation'}: set the attention "
                     f"implementation to 'pallas' (model.attention_impl=pallas) on a sparse variant, or {name}=None "
                     "(model.attention_kernels=null)")
  return kernels


def resolve_sparse(impl: str, interpret: bool) -> str:
  """Sparse attention's implementation: ``"auto"`` is ``"pallas"`` on a GPU or TPU, or with
  ``interpret``, else (and under x64, where the kernels do not run) ``"xla"``."""
  if check_implementation("sparse", impl) != "auto":
    return impl
  pallas = interpret or jax.default_backend() in ("gpu", "tpu")
  return "pallas" if pallas and not jax.config.jax_enable_x64 else "xla"


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def deterministic_ops() -> bool:
  """Whether XLA runs only deterministic GPU algorithms (``XLA_FLAGS`` holds ``DETERMINISTIC_FLAG``)."""
  return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "").split()


def resolve_dense(impl: str, dtype: jnp.dtype, interpret: bool) -> str:
  """Dense attention's implementation: ``"auto"`` is ``"cudnn"`` on a GPU for bfloat16 or float16
  inputs (``dtype``) without ``interpret``, else ``"xla"`` (cuDNN has no interpret mode). Under
  XLA's deterministic ops (``deterministic_ops``) ``"auto"`` is ``"xla"``: jax 0.11.2's train step
  through cuDNN's fused attention fails to compile there (an ``IndexError`` from XLA's
  ``raw_hash_map::at``, H100)."""
  if check_implementation("dense", impl) != "auto":
    return impl
  cudnn = (not interpret and jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
           and not deterministic_ops())
  return "cudnn" if cudnn else "xla"


def _runnable(name: str, impl: str, interpret: bool) -> str:
  """``impl``, unless it is ``"pallas"`` (GPU kernels) asked for off a GPU without ``interpret``:
  then ``ValueError`` naming ``name`` and the fix."""
  if impl == "pallas" and not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"{name}='pallas' runs GPU kernels (the default backend is {jax.default_backend()}); use "
                     f"{name}='auto' or 'xla', or interpret=True to run them on CPU")
  if impl == "pallas" and jax.config.jax_enable_x64:
    raise ValueError(f"{name}='pallas': the Pallas kernels index in int32 and do not run with jax_enable_x64 on; use "
                     f"{name}='auto' or 'xla'")
  return impl


def _pallas_here(interpret: bool) -> bool:
  """Whether ``"auto"`` may pick a Pallas kernel: on a GPU or with ``interpret``, never under x64."""
  return (interpret or jax.default_backend() == "gpu") and not jax.config.jax_enable_x64


def resolve_decode(impl: str, fusable: bool, interpret: bool) -> str:
  """Decoding's implementation: ``"auto"`` is ``"pallas"`` (the fused block step) where it is the
  faster path for the block's shapes (``fusable``: ``pallas_kernels.decode.block.fusable``, never
  for grouped-query attention), on a GPU or with ``interpret``, else ``"xla"``."""
  if check_implementation("decode", impl) != "auto":
    return _runnable("decode_impl", impl, interpret)
  return "pallas" if fusable and _pallas_here(interpret) else "xla"


def resolve_norm(impl: str, sequence: bool, interpret: bool) -> str:
  """The RMSNorm's implementation: ``"auto"`` is ``"pallas"`` (the one-pass kernel) over a
  ``sequence`` (more than one token per row; a decoded token takes XLA's), on a GPU or with
  ``interpret``, else ``"xla"``."""
  if check_implementation("norm", impl) != "auto":
    return _runnable("norm_impl", impl, interpret)
  return "pallas" if sequence and _pallas_here(interpret) else "xla"
