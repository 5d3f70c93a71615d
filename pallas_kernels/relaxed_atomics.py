"""Relaxed memory ordering for the atomic adds of marked Pallas (Triton) kernels.

Pallas' Triton lowering emits every atomic with acquire-release ordering at GPU scope, and
``plgpu.atomic_add(ref, idx, val, mask=)`` has no argument to choose another. The fused decode
kernels (``decode_projections``, ``decode_attention``) use atomics only as reductions: each adds
partial sums into a float32 buffer that nothing in the same kernel reads, and the next kernel
starts after this one ends. Relaxed ordering gives the same sums (the order of the adds was
never fixed) without making each add wait for the thread's earlier memory operations.

``mark(name)`` gives a kernel name (``pallas_call(..., name=)``) whose atomic adds are lowered
relaxed; every other kernel's atomics keep Pallas' ordering. ``install()`` wraps the lowering
rule of Pallas' ``atomic_rmw`` primitive: after the original rule emits an add in a marked
kernel, the wrapper sets that op's ordering to relaxed. Nothing is installed on import: the
kernels that need it call ``install()`` when they are built (it is idempotent).

The wrapper reaches private JAX names (the Triton lowering-rule table and the primitive), so it
is installed only on the JAX versions it was tested on (``TESTED_JAX``, the range stated in
``pyproject.toml``). On any other version, or where those names are missing, nothing is
installed: marked kernels keep acquire-release ordering (same results, slower), one warning
says so, and ``installed()`` is False.
"""

from __future__ import annotations

import warnings

import jax

PREFIX = "relaxed_atomics_"
TESTED_JAX: tuple[tuple[int, int], ...] = ((0, 10), (0, 11))  # (major, minor) versions

_warned = False


def mark(name: str) -> str:
  """The kernel name under which ``name``'s atomic adds are lowered with relaxed ordering."""
  return PREFIX + name


def _lowering():
  """``(rule table, atomic primitive)`` of Pallas' Triton lowering (private JAX names)."""
  from jax._src.pallas.triton import lowering, primitives  # noqa: PLC0415

  return lowering.triton_lowering_rules, primitives


def installed() -> bool:
  """Whether the lowering rule of Pallas' ``atomic_rmw`` is this module's wrapper."""
  try:
    rules, primitives = _lowering()
    return getattr(rules[primitives.atomic_rmw_p], "relaxed_atomics_wrapper", False)
  except (ImportError, AttributeError, KeyError):
    return False


def _wrap(original, relaxed_attr, atomic_add, rmw_name: str):
  def rule(ctx, *args, **params):
    out = original(ctx, *args, **params)
    if params.get("atomic_type") == atomic_add and ctx.context.name.startswith(PREFIX):
      op = out.owner  # the add the original rule emitted (its old-value result is ``out``)
      if op.name == rmw_name:
        op.attributes["sem"] = relaxed_attr(op.context)
    return out

  rule.relaxed_atomics_wrapper = True
  rule.wrapped = original
  return rule


def _fall_back(reason: str) -> bool:
  """Warns once per process that marked kernels keep Pallas' ordering; returns False."""
  global _warned
  if not _warned:
    _warned = True
    warnings.warn(f"fibjax: {reason}; fused decode kernels keep acquire-release atomics (same results, slower)",
                  stacklevel=3)
  return False


def install() -> bool:
  """Installs the wrapper once (idempotent) on a tested JAX version; returns ``installed()``."""
  version = tuple(jax.__version_info__[:2])
  if version not in TESTED_JAX:
    return _fall_back(f"relaxed atomics are tested on jax {TESTED_JAX}, not on {jax.__version__}")
  if installed():
    return True
  try:
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax._src.lib.triton import dialect as tt  # noqa: PLC0415

    rules, primitives = _lowering()
    original = rules[primitives.atomic_rmw_p]
    atomic_add = primitives.AtomicOpType.ADD
    build = ir.AttrBuilder.get("TT_MemSemanticAttr")
    relaxed_attr = lambda context: build(tt.MemSemantic.RELAXED, context=context)  # noqa: E731
    rmw_name = tt.AtomicRMWOp.OPERATION_NAME
  except (ImportError, AttributeError, KeyError) as e:
    return _fall_back(f"Pallas' Triton lowering has changed ({e!r})")
  rules[primitives.atomic_rmw_p] = _wrap(original, relaxed_attr, atomic_add, rmw_name)
  return True
